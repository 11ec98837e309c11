"""The ComfyUI-compatibility contract (safegen_comfy/compat.py): every internal the seam uses exists in
the ComfyUI under test with the parameters relied on, and the check names what broke.

Runs against whichever ComfyUI the suite uses (``SAFEGEN_COMFYUI``, default <repo>/.comfyui), so
``make test`` checks 0.3.75 and ``make test-compat`` the other version.
"""
import importlib
import logging

import pytest

from tests.packload import load_pack, pack_module


@pytest.fixture(scope="module")
def compat():
    load_pack()
    return pack_module("safegen_comfy.compat")


def test_every_listed_internal_is_present(compat):
    broken = compat.check_contract()
    assert broken == [], "\n".join(broken)
    assert len(compat.INTERNALS) >= 30


def _item(compat, attr):
    return next(i for i in compat.INTERNALS if i.attr == attr)


def test_removed_internal_is_named_with_the_version(compat, monkeypatch):
    import comfy.samplers
    monkeypatch.delattr(comfy.samplers, "calc_cond_batch")
    broken = compat.check_contract()
    assert len(broken) == 1, broken
    assert broken[0].startswith("comfy.samplers.calc_cond_batch: missing")
    assert f"ComfyUI {compat.comfy_version()}" in broken[0] and compat.comfy_version() != "unknown"
    assert "SLD Safety Guidance" in compat.affected_nodes()


def test_changed_arity_is_named(compat, monkeypatch):
    import comfy.sd1_clip
    monkeypatch.setattr(comfy.sd1_clip, "load_embed", lambda embedding_name, embedding_directory: None)
    broken = compat.check_contract()
    assert len(broken) == 1, broken
    assert broken[0].startswith("comfy.sd1_clip.load_embed: signature changed, parameter(s) embedding_size gone")


def test_method_removed_from_a_class(compat, monkeypatch):
    import comfy.model_patcher
    monkeypatch.delattr(comfy.model_patcher.ModelPatcher, "get_key_patches")
    assert compat.check_contract() == [
        msg for msg in compat.check_contract() if msg.startswith("comfy.model_patcher.ModelPatcher.get_key_patches")]
    assert len(compat.check_contract()) == 1


def test_static_item_read_from_source(compat, tmp_path, monkeypatch):
    """Items of modules only a running server imports (server.py) are read from their source."""
    item = _item(compat, "PromptServer.send_progress_text")
    assert item.static and compat.check_item(item) is None
    fake = tmp_path / "fake_server_mod.py"
    fake.write_text("class PromptServer:\n    def send_progress_text(self, text):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = compat.Internal("fake_server_mod", "PromptServer.send_progress_text", ("text", "node_id"), static=True)
    assert "parameter(s) node_id gone" in compat.check_item(bad)


def test_import_time_warning_is_one_line_naming_nodes(compat, monkeypatch, caplog):
    import comfy.samplers
    monkeypatch.delattr(comfy.samplers, "cfg_function")
    with caplog.at_level(logging.WARNING, logger="safegen"):
        out = pack_module("nodes").check_comfyui()
    assert len(out) == 1
    warns = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1
    msg = warns[0].getMessage()
    assert "SLD Guider" in msg and "comfy.samplers.cfg_function" in msg and compat.comfy_version() in msg


def test_nodes_still_register_when_an_internal_is_missing(compat, monkeypatch):
    """A missing internal is reported, not fatal: every node module still imports."""
    import comfy.samplers
    monkeypatch.delattr(comfy.samplers, "cfg_function")
    nodes = pack_module("nodes").collect()
    assert len(nodes) == 12
    assert importlib.import_module("comfy.samplers") is comfy.samplers
