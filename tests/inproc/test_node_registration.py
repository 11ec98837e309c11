"""Registration is per node module: a module that fails to import takes only its own nodes away."""
import builtins
import logging

from tests.packload import load_pack, pack_module

EXPECTED = {
    "unlearned_loader": {"SafeGen_UnlearnedUNetLoader"},
    "inversion": {"SafeGen_ConceptInversionTrainer", "SafeGen_LoadImplicitNegativeEmbedding"},
    "sld": {"SafeGen_SLDGuidance", "SafeGen_SLDGuider"},
    "safree": {"SafeGen_SAFREEPromptFilter", "SafeGen_SAFREEReattention"},
    "safe_text_encoder": {"SafeGen_SafeTextEncoderTrainer", "SafeGen_SafeTextEncoder"},
    "esd": {"SafeGen_ESDConceptEraser"},
    "dark_miner": {"SafeGen_DarkMinerEraser"},
    "nudenet_check": {"SafeGen_NudeNetSafetyCheck"},
}


def ids(nodes):
    return {n.define_schema().node_id for n in nodes}


def test_every_module_registers_its_nodes():
    load_pack()
    nodes_pkg = pack_module("nodes")
    assert set(nodes_pkg.MODULES) == set(EXPECTED)
    assert ids(nodes_pkg.collect()) == set().union(*EXPECTED.values())


def test_one_failing_module_leaves_the_others(monkeypatch, caplog):
    """Force the ESD node module's import to fail (as a broken dependency would): the other 11 nodes stay."""
    load_pack()
    nodes_pkg = pack_module("nodes")
    import sys
    name = f"{nodes_pkg.__name__}.esd"
    monkeypatch.delitem(sys.modules, name, raising=False)
    real_import = builtins.__import__

    def failing(n, globals=None, locals=None, fromlist=(), level=0):
        if globals and globals.get("__name__") == name:
            raise ImportError("forced failure of nodes.esd for the test")
        return real_import(n, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", failing)
    with caplog.at_level(logging.ERROR, logger="safegen"):
        got = ids(nodes_pkg.collect())
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert got == set().union(*(v for k, v in EXPECTED.items() if k != "esd"))
    assert any("nodes.esd" in r.getMessage() for r in caplog.records)
