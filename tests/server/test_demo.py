"""`make demo`'s main job (tools/demo.py -> tools/demo_world.py) and the INE it ships in ``embeddings/``.

The demo run here is a smoke run of the very pipeline ``make demo`` runs (its own ComfyUI server, ESD ->
concept inversion on the erased model -> six arms judged by the world's detector -> index.html), with
1 prompt per set and 10 training steps, and a fresh cache folder so it trains. Its page is then opened
in headless Chromium as a reader sees it: every arm is a column of the grid with a verdict per image,
no image is broken, and the numbers on the page are those of results.json beside it. The full demo's
numbers (4 prompts per set, 200 training steps) are measured by ``make demo`` itself and quoted in
docs/miniature-world.md, not asserted here (the suite cannot afford its 3-6 minutes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tools.comfy_host import REPO_ROOT
from tools.demo_world import ARM_LABELS, ARMS, BATCH, CHECKPOINT_COLUMNS, SHIPPED_INE, WORLD_COLUMNS
from tools.frontend import NODE_MODULES, ensure_browser

def test_demo_writes_a_page_whose_grid_and_numbers_match_its_json(tmp_path):
    out = tmp_path / "demo_out"
    p = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "demo.py"), "--out", str(out), "--per-set", "1",
                        "--train-steps", "10", "--cache", str(tmp_path / "cache")],
                       cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("SafeGen demo: open ")]
    assert line, p.stdout  # it prints where the page is
    page = line[-1][len("SafeGen demo: open "):].strip()
    assert os.path.isfile(page) and page.endswith("index.html")
    run_dir = os.path.dirname(page)
    run = json.loads(open(os.path.join(run_dir, "results.json")).read())
    # it trained (fresh cache): both loss plots and both trained files are beside the page
    assert set(run["loss_plots"]) == {"esd", "ine"} and "cached" not in run["train_seconds"].values()
    for f in run["trained_files"].values():
        assert os.path.isfile(os.path.join(run_dir, f)), f
    # the workflow JSON it links is the graph it ran: API format, the INE arm's nodes in it
    wf = json.loads(open(os.path.join(run_dir, run["workflow_file"])).read())
    classes = {n["class_type"] for n in wf.values()}
    assert {"SafeGen_UnlearnedUNetLoader", "SafeGen_LoadImplicitNegativeEmbedding", "SafeGen_SLDGuidance",
            "KSampler", "SaveImage"} <= classes, classes

    assert len(run["cells"]) == 3 * BATCH  # 3 sets x 1 prompt x BATCH images
    for m in run["metrics"].values():
        assert m["n_direct"] == m["n_paraphrase"] == m["n_benign"] == BATCH
    _page_reads_as_its_json(page, tmp_path / "demo.png", run, WORLD_COLUMNS)


def _page_reads_as_its_json(page: str, shot, run: dict, columns) -> dict:
    """Open the page in headless Chromium: every arm a grid column, each image's verdict = the JSON's, the
    numbers = the JSON's, no broken image. Returns what the browser saw."""
    ensure_browser()
    r = subprocess.run(["node", str(REPO_ROOT / "tools" / "frontend" / "page.js"), page, str(shot)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, NODE_PATH=str(NODE_MODULES)))
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.splitlines()[-1])
    assert seen["images"] > 0 and not seen["broken"], seen["broken"][:5]
    tables = {t["id"]: t for t in seen["tables"]}
    grid, metrics = tables["grid"], tables["metrics"]
    assert grid["head"][1:] == [ARM_LABELS[a] for a in ARMS]
    assert len(grid["cells"]) == len(ARMS) * len(run["cells"])
    for c, want in zip(grid["cells"], [v for cell in run["cells"] for v in (cell["verdicts"][a] for a in ARMS)]):
        word, prob = c["text"].split()
        assert word == ("concept" if want["flagged"] else "clean") and prob == f"{want['concept_prob']:.2f}"
    shown = {(c["arm"], c["metric"]): c["text"] for c in metrics["cells"]}
    assert metrics["head"][1:] == [label for _, label, _ in columns]
    assert set(run["metrics"]) == set(ARMS)
    for arm, m in run["metrics"].items():
        for k, _, _ in columns:
            assert shown[(arm, k)] == ("n/a" if m[k] is None else f"{m[k]:.3f}"), (arm, k)
    assert shot.stat().st_size > 10_000
    return seen


def test_checkpoint_demo_runs_the_same_pipeline_judged_by_nudenet(tmp_path):
    """make demo CHECKPOINT=…: the same arms and page on a checkpoint given by path (here the tiny SD1 model, --small:
    64 px, 3 steps): ESD-u trained by the ESD node, inversion on the erased model, NudeNet verdicts; the page reads as
    its JSON. (Random weights draw no nudity: the test checks the pipeline, not an effect.)"""
    from tools.tiny_models import ensure
    out = tmp_path / "demo_out"
    p = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "demo.py"), "--checkpoint", str(ensure("sd1")),
                        "--small", "--train-steps", "2", "--per-set", "2", "--out", str(out)],
                       cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    page = [ln for ln in p.stdout.splitlines() if ln.startswith("SafeGen demo: open ")][-1].split(" open ", 1)[1]
    run_dir = os.path.dirname(page)
    run = json.loads(open(os.path.join(run_dir, "results.json")).read())
    assert run["mode"] == "checkpoint" and run["concept_text"] == "nudity" and run["size"] == 64
    assert set(run["loss_plots"]) == {"esd", "ine"} and "ESD-u" in run["train_info"]["esd"]
    assert "objective ldm" in run["train_info"]["ine"]
    for f in run["trained_files"].values():
        assert os.path.isfile(os.path.join(run_dir, f)), f
    assert {c["kind"] for c in run["cells"]} == {"direct", "benign"} and len(run["cells"]) == 2 * 2 * BATCH
    # each verdict is NudeNet's (the pack's defaults) on exactly the image saved beside the page
    import numpy as np
    from PIL import Image

    from safegen_core import nudenet_check
    verdicts = [v for cell in run["cells"] for v in cell["verdicts"].values()]
    again = nudenet_check.check_images([np.asarray(Image.open(os.path.join(run_dir, v["image"])).convert("RGB"))
                                        for v in verdicts])
    assert [(v["flagged"], round(v["concept_prob"], 4)) for v in verdicts] == \
        [(bool(r["unsafe"]), round(float(r["max_score"]), 4)) for r in again]
    _page_reads_as_its_json(page, tmp_path / "ck.png", run, CHECKPOINT_COLUMNS)


def test_shipped_ine_is_the_demos_and_says_what_it_was_learned_on():
    """embeddings/world_red_ine.safetensors exists in a clone, carries the metadata item 4 asks for, and
    was made with the demo's current settings (else a fresh-clone demo would train it again)."""
    from safetensors import safe_open

    from benchmarks import bench_world as BW
    assert SHIPPED_INE.is_file(), SHIPPED_INE
    with safe_open(str(SHIPPED_INE), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        vec = f.get_tensor(keys[0])
    assert keys == ["emb_params"] and vec.shape == (1, 768) and bool(vec.isfinite().all())
    assert meta["safegen_kind"] == "implicit_negative_embedding"
    assert len(meta["base_model_hash"]) >= 16 and meta["unlearned_file"] == "world_esd.safetensors"
    assert meta["objective"] == BW.TRAIN["ine"]["objective"] and int(meta["steps"]) == BW.TRAIN["ine"]["steps"]
    assert len(meta["erased_file_tensors_hash"]) == 16
    assert json.loads(meta["demo_ine_settings"]) == BW.TRAIN["ine"]
    assert json.loads(meta["demo_esd_settings"]) == BW.TRAIN["esd"]
    assert (REPO_ROOT / "embeddings" / "README.md").is_file()


def test_fresh_install_lists_the_shipped_ine(comfy_server):
    spec = comfy_server.object_info()["SafeGen_LoadImplicitNegativeEmbedding"]["input"]["required"]["embedding_name"]
    options = spec[0] if isinstance(spec[0], list) else spec[1].get("options")
    assert SHIPPED_INE.name in options, options
