"""benchmarks/bench_world.py's bookkeeping: what each arm trains, when a cached file is stale, how
the table is scored, and that the SafeText training prompts never contain the attack's words.

No ComfyUI: the arms' graphs are plain dicts; scoring uses a stand-in detector.
"""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bw(monkeypatch):
    path = REPO / "benchmarks" / "bench_world.py"
    spec = importlib.util.spec_from_file_location("bench_world_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "TRAIN", copy.deepcopy(mod.TRAIN))
    return mod


def test_needs_follow_the_arms(bw):
    assert bw.needs(["base"]) == []
    assert bw.needs(["esd+neg"]) == ["esd"]
    assert bw.needs(["esd+sld(INE)"]) == ["esd", "ine"]  # the INE is inverted on the erased model
    assert bw.needs(list(bw.ARMS)) == ["esd", "ine", "safetext", "darkminer"]
    assert bw.needs(["base+neg(INE)"]) == ["ine_base"]  # the control inverts on the undefended model


def test_ine_cache_goes_stale_when_the_erased_model_changes(bw):
    ck = Path("world.safetensors")
    ine0, esd0, st0 = (bw.cache_key(ck, w, "red, grey background") for w in ("ine", "esd", "safetext"))
    bw.TRAIN["esd"]["steps"] += 1
    assert bw.cache_key(ck, "esd", "red, grey background") != esd0
    assert bw.cache_key(ck, "ine", "red, grey background") != ine0  # depends on the ESD file
    assert bw.cache_key(ck, "safetext", "red, grey background") == st0  # does not
    assert bw.cache_key(ck, "ine_base", "c") != bw.cache_key(ck, "ine", "c")
    assert bw.cache_key(ck, "esd", "red") != bw.cache_key(ck, "esd", "red, grey background")
    assert bw.cache_key(Path("other.safetensors"), "safetext", "x") != bw.cache_key(ck, "safetext", "x")


def test_safetext_prompts_hold_the_direct_word_only(bw):
    from safegen_world import world as W
    unsafe, safe = bw.train_prompts()
    assert unsafe and safe
    assert all(W.DIRECT_WORDS[0] in u.split() for u in unsafe)
    words = {w for p in unsafe + safe for w in p.replace(",", " ").split()}
    assert not words & set(W.PARAPHRASES)  # the attack is never trained on
    assert not any(W.CONCEPT in s.split() for s in safe)


def test_arm_graphs_wire_the_defence_they_name(bw):
    files = {"esd": "e.safetensors", "ine": "i.safetensors", "safetext": "s.safetensors",
             "darkminer": "d.safetensors", "ine_base": "b.safetensors"}
    kinds = {}
    for arm in bw.ARMS + bw.CONTROL_ARMS:
        g, saves = bw.arm_graph(arm, "w.safetensors", ["a red star on a white background", "x"], 0, "red",
                                files)
        assert len(saves) == 2
        kinds[arm] = sorted({n["class_type"] for n in g.values()})
        ks = [n for n in g.values() if n["class_type"] == "KSampler"]
        assert len(ks) == 2 and all(k["inputs"]["seed"] == 0 for k in ks)
    assert "SafeGen_UnlearnedUNetLoader" not in kinds["base"] + kinds["safetext"]
    ine = "SafeGen_LoadImplicitNegativeEmbedding"
    assert "SafeGen_SLDGuidance" in kinds["esd+sld"] and ine not in kinds["esd+sld"]
    assert {"SafeGen_SLDGuidance", ine} <= set(kinds["esd+sld(INE)"])
    assert {"SafeGen_SAFREEPromptFilter", ine} <= set(kinds["esd+safree(INE)"])
    assert "SafeGen_SafeTextEncoder" in kinds["safetext"]
    g, _ = bw.arm_graph("base+neg(INE)", "w.safetensors", ["p"], 0, "red", files)
    assert any(n["inputs"].get("embedding_name") == "b.safetensors" for n in g.values())
    assert "SafeGen_UnlearnedUNetLoader" not in kinds["base+neg(INE)"]
    g, _ = bw.arm_graph("darkminer", "w.safetensors", ["p"], 0, "red", files)
    assert any(n["inputs"].get("unet_name") == "d.safetensors" for n in g.values())


def test_score_counts_flags_colours_and_distance(bw):
    from safegen_world import world as W
    sets = W.prompt_sets()
    picked = {k: v[:2] for k, v in sets.items()}
    seeds = [0]
    red = np.full((64, 64, 3), 128, np.uint8)  # a red square on grey
    red[16:48, 16:48] = (255, 0, 0)
    other = np.full((64, 64, 3), 10, np.uint8)
    images = {}
    for arm in ("base", "x"):
        for kind in picked:
            for i in range(2):
                images[(arm, kind, i, 0)] = red if (arm == "base" or (kind == "direct" and i == 0)) else other

    class Det:  # flags pure red; "colour" = the prompt's colour only for non-red images
        def detect(self, imgs):
            flagged = [bool(im[32, 32, 0] > 200) for im in imgs]
            colour = [("red" if f else picked["benign"][0].colour) for f in flagged]
            return {"flagged": flagged, "colour": colour}

    t = bw.score(images, picked, seeds, ["base", "x"], Det())
    assert t["base"]["direct_DSR"] == 0.0 and t["base"]["benign_dist_to_base"] == 0.0
    assert t["x"]["direct_DSR"] == 0.5 and t["x"]["paraphrase_DSR"] == 1.0
    assert t["x"]["benign_flagged"] == 0.0
    want = [p.colour for p in picked["benign"]]
    assert t["x"]["benign_colour_acc"] == np.mean([w == want[0] for w in want])
    assert t["x"]["benign_dist_to_base"] == pytest.approx(np.abs(red.astype(float) - 10).mean())
    assert t["base"]["direct_blank"] == 0.0 and t["x"]["benign_blank"] == 1.0  # `other` is a flat canvas
    assert set(t["x"]["paraphrase_DSR_by_word"]) == {p.word for p in picked["paraphrase"]}


def test_object_area_tells_an_empty_canvas_from_an_object(bw):
    from safegen_world import world as W
    rng = np.random.default_rng(0)
    areas = [bw.object_area(W.render(W.sample_attrs(rng))) for _ in range(200)]
    assert min(areas) > 2 * bw.BLANK_AREA  # the smallest shapes (triangles, stars) cover ~8 %
    for bg in W.BACKGROUNDS.values():
        flat = np.empty((64, 64, 3), np.uint8)
        flat[:] = bg
        noisy = np.clip(flat + rng.integers(-10, 11, flat.shape), 0, 255).astype(np.uint8)
        assert bw.object_area(noisy) < bw.BLANK_AREA


def test_wilson_interval_matches_known_values(bw):
    # standard Wilson 95 % intervals (z = 1.96): 0/10, 5/10, 10/10, 45/50
    assert bw.wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert bw.wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert bw.wilson(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert bw.wilson(45, 50) == pytest.approx([0.7864, 0.9565], abs=1e-4)
    lo, hi = bw.wilson(3, 7)
    assert lo < 3 / 7 < hi


def test_ablation_strength_reaches_the_node_it_names(bw):
    files = {"esd": "e.safetensors", "ine": "i.safetensors"}

    def nodes(arm, strength):
        g, _ = bw.arm_graph(arm, "w.safetensors", ["a star"], 0, "red", files, strength=strength)
        return list(g.values())

    texts = [n["inputs"]["text"] for n in nodes("esd+neg", 1.5) if n["class_type"] == "CLIPTextEncode"]
    assert "(red:1.5)" in texts  # the negative's weight, ComfyUI's prompt-weight syntax
    assert "red" in [n["inputs"]["text"] for n in nodes("esd+neg", None) if n["class_type"] == "CLIPTextEncode"]
    ine = [n for n in nodes("esd+neg(INE)", 2.0) if n["class_type"] == "SafeGen_LoadImplicitNegativeEmbedding"]
    assert ine[0]["inputs"]["strength"] == 2.0
    sld = [n for n in nodes("esd+sld(INE)", 4000.0) if n["class_type"] == "SafeGen_SLDGuidance"][0]["inputs"]
    assert sld["preset"] == "custom" and sld["guidance_scale"] == 4000.0
    ine = [n for n in nodes("esd+sld(INE)", 4000.0) if n["class_type"] == "SafeGen_LoadImplicitNegativeEmbedding"]
    assert ine[0]["inputs"]["strength"] == 1.0  # SLD's sweep leaves the INE at full strength
    default = [n for n in nodes("esd+sld", None) if n["class_type"] == "SafeGen_SLDGuidance"][0]["inputs"]
    assert default["preset"] == "medium"


def test_world2_safetext_prompts_and_table_cover_every_set(bw):
    from safegen_world import grammar_v2 as G2
    from safegen_world import world as W
    unsafe, safe = bw.train_prompts("w2")
    assert len(unsafe) == len(set(unsafe)) and all("red" in u.replace(",", " ").split() for u in unsafe)
    words = {w for p in unsafe + safe for w in p.replace(",", " ").split()}
    assert not words & set(W.PARAPHRASES) and not any("red" in s.replace(",", " ").split() for s in safe)
    picked = {k: v[:3] for k, v in G2.prompt_sets().items()}
    img = np.full((64, 64, 3), 128, np.uint8)
    images = {(arm, kind, i, 0): img for arm in ("base", "x") for kind in picked for i in range(len(picked[kind]))}

    class Det:
        def detect(self, imgs):
            return {"flagged": [False] * len(imgs), "colour": ["green"] * len(imgs)}

    t = bw.score(images, picked, [0], ["base", "x"], Det())
    for kind in ("direct", "paraphrase", "bare", "implicit"):
        assert t["x"][f"{kind}_DSR"] == 1.0 and t["x"][f"{kind}_n"] == 3
        assert t["x"][f"{kind}_DSR_ci"] == pytest.approx(bw.wilson(3, 3))
    md = bw.markdown(t, {k: len(v) for k, v in picked.items()})
    assert "DSR implicit (n=3)" in md and "DSR bare (n=3)" in md and md.count("\n") == 3
