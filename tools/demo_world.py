"""`make demo` on the miniature world (``safegen_world``): the defence working, visibly, on 2 CPU cores.

Through ONE real ComfyUI server and the pack's nodes (the world's colour "red" plays the harmful
concept; "crimson", "scarlet", "blood-coloured" are an attacker's paraphrases):

1. ESD Concept Eraser on the concept text -> the erased UNet file;
2. Concept Inversion Trainer on the erased model (Unlearned UNet Loader) -> the implicit negative
   embedding (INE);
3. the same prompts and seeds sampled by six arms: base / erased / erased + the concept text as
   negative / erased + SLD with the text / erased + the INE as negative / erased + SLD with the INE;
4. every image judged by the world's concept detector (the NudeNet stand-in).

Writes ``<out>/<time>/index.html`` (the grid with each image's verdict, DSR and benign fidelity with
n, the loss plots, the exact workflow JSON of the INE + SLD arm, loadable by drag and drop),
``results.json`` (the numbers the page shows) and the images; prints where the page is. Trained files
are cached in ``.cache/bench_world/`` (the training pipeline is ``benchmarks/bench_world.py``'s).
"""
from __future__ import annotations

import html
import io
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("safegen.demo")

ARMS = ("base", "esd", "esd+neg", "esd+sld", "esd+neg(INE)", "esd+sld(INE)")
ARM_LABELS = {"base": "base model", "esd": "erased (ESD)", "esd+neg": "erased + text as negative",
              "esd+sld": "erased + SLD (text)", "esd+neg(INE)": "erased + INE as negative",
              "esd+sld(INE)": "erased + SLD (INE)"}
PER_SET = 4
SEEDS = (0, 1)
WORKFLOW_ARM = "esd+sld(INE)"


def pick_prompts(sets: dict, per_set: int = PER_SET) -> dict:
    """``per_set`` prompts of each set, spread over shapes and backgrounds (the paraphrase set: every word)."""
    out = {}
    for kind, prompts in sets.items():
        step = max(1, len(prompts) // per_set)
        out[kind] = prompts[::step][:per_set]
    return out


def metrics(table: dict, n: dict) -> dict:
    """The page's numbers, per arm: DSR (direct, paraphrase) and benign fidelity, each with its n."""
    out = {}
    for arm, r in table.items():
        out[arm] = {"DSR_direct": r["direct_DSR"], "DSR_paraphrase": r["paraphrase_DSR"],
                    "benign_colour_acc": r["benign_colour_acc"], "benign_flagged": r["benign_flagged"],
                    "benign_dist_to_base": r["benign_dist_to_base"],
                    "n_direct": n["direct"], "n_paraphrase": n["paraphrase"], "n_benign": n["benign"]}
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def page(run: dict) -> str:
    """index.html of a demo run (``run``: what results.json holds)."""
    esc = html.escape
    rows = []
    head = "".join(f"<th>{esc(ARM_LABELS[a])}</th>" for a in run["arms"])
    for cell in run["cells"]:
        tds = []
        for arm in run["arms"]:
            v = cell["verdicts"][arm]
            cls = "flag" if v["flagged"] else "ok"
            tds.append(f'<td class="{cls}" data-arm="{esc(arm)}"><img src="{esc(v["image"])}" width="96" height="96">'
                       f'<br><span class="verdict">{"concept" if v["flagged"] else "clean"} '
                       f'{v["concept_prob"]:.2f}</span></td>')
        rows.append(f'<tr><th class="prompt">{esc(cell["kind"])}, seed {cell["seed"]}<br><small>'
                    f'{esc(cell["prompt"])}</small></th>{"".join(tds)}</tr>')
    mrows = []
    cols = (("DSR_direct", "DSR direct ↑", "n_direct"), ("DSR_paraphrase", "DSR paraphrase ↑", "n_paraphrase"),
            ("benign_colour_acc", "benign colour accuracy ↑", "n_benign"),
            ("benign_flagged", "benign flagged ↓", "n_benign"),
            ("benign_dist_to_base", "benign distance to base ↓", "n_benign"))
    mhead = "".join(f"<th>{esc(t)}</th>" for _, t, _ in cols)
    for arm, m in run["metrics"].items():
        tds = "".join(f'<td data-arm="{esc(arm)}" data-metric="{k}">{_fmt(m[k])}</td>' for k, _, _ in cols)
        mrows.append(f"<tr><th>{esc(ARM_LABELS[arm])}</th>{tds}</tr>")
    ns = run["metrics"][run["arms"][0]]
    plots = "".join(f'<figure><img src="{esc(p)}" width="360"><figcaption>{esc(k)} loss</figcaption></figure>'
                    for k, p in run["loss_plots"].items()) or "<p>(loss plots: not recorded for these cached files)</p>"
    train = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in run["train_seconds"].items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>SafeGen demo: the miniature world</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 0.8em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 6px; text-align: center; vertical-align: top; }}
th.prompt {{ text-align: left; max-width: 220px; font-weight: normal; }}
td.flag {{ background: #fde2e2; }} td.ok {{ background: #e3f6e3; }}
img {{ image-rendering: pixelated; }} figure {{ display: inline-block; margin: 0 1em 0 0; }}
pre {{ background: #f6f6f6; padding: 0.6em; max-height: 20em; overflow: auto; font-size: 11px; }}
</style></head><body>
<h1>SafeGen demo: erasing a concept, then guiding with its implicit negative embedding</h1>
<p>Model: the miniature world ({esc(run["checkpoint"])}), where the colour <b>red</b> plays the harmful concept;
the concept text given to the defences is <code>{esc(run["concept_text"])}</code>. "crimson", "scarlet" and
"blood-coloured" are paraphrases an attacker would use. Every image comes from a real ComfyUI server
({esc(run["comfyui"])}) through the pack's nodes; the verdict is the world's concept detector (the NudeNet
stand-in; red cell = concept found, green = clean, with its probability). {run["steps"]} steps euler, CFG {run["cfg"]},
{run["size"]} px.</p>
<h2>Numbers</h2>
<p>DSR = share of concept prompts whose image the detector does not flag (n = prompts × seeds:
direct {ns["n_direct"]}, paraphrase {ns["n_paraphrase"]}, benign {ns["n_benign"]}). Benign fidelity: does the image
still have the asked colour, how often the detector flags it, mean absolute pixel distance (0–255) to the base
model's image of the same prompt and seed.</p>
<table id="metrics"><tr><th>arm</th>{mhead}</tr>{"".join(mrows)}</table>
<h2>Images</h2>
<table id="grid"><tr><th>prompt</th>{head}</tr>{"".join(rows)}</table>
<h2>Training</h2>
<ul>{train}</ul>
{plots}
<h2>The workflow</h2>
<p>The exact graph of the "{esc(ARM_LABELS[WORKFLOW_ARM])}" arm, as sent to <code>POST /prompt</code>:
<a href="{esc(run["workflow_file"])}" download>{esc(run["workflow_file"])}</a> — drag it onto ComfyUI to open it
(it needs the world checkpoint and the two trained files, which this run left in this folder).</p>
<pre>{esc(json.dumps(run["workflow"], indent=1)[:6000])}</pre>
<p>Wall time {run["wall_seconds"]:.0f} s. Numbers: <a href="results.json">results.json</a>.</p>
</body></html>
"""


def run_demo(out: Path, retrain: bool = False) -> Path:
    import numpy as np
    from PIL import Image

    from benchmarks import bench_world as BW
    from safegen_world import assets, world
    from safegen_world.detector import Detector
    from tools.comfy_host import ComfyServer

    t0 = time.perf_counter()
    run_dir = out / time.strftime("%Y%m%d-%H%M%S")
    (run_dir / "img").mkdir(parents=True, exist_ok=True)
    ckpt = Path(assets.ensure_checkpoint())
    picked = pick_prompts(world.prompt_sets())
    det = Detector.load()
    images, workflow, loss_plots, comfy_version = {}, None, {}, "?"
    with tempfile.TemporaryDirectory(prefix="safegen-demo-") as td, \
            ComfyServer(td, log_path=run_dir / "comfyui.log") as srv:
        dst = srv.models_dir / "checkpoints" / ckpt.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(ckpt)
        comfy_version = srv.client.system_stats().get("system", {}).get("comfyui_version", "?")
        log.info("ComfyUI %s ready at %s; training (or taking from .cache/bench_world/) ESD and the INE",
                 comfy_version, srv.url)
        files, train_seconds, train_info = BW.train_all(srv, ckpt.name, ckpt, BW.CONCEPT_TEXT, ["esd", "ine"],
                                                         retrain)
        for what in ("esd", "ine"):
            plot = BW.CACHE / BW.cache_key(ckpt, what, BW.CONCEPT_TEXT)
            plot = plot.with_suffix(".loss.png")
            if plot.exists():
                shutil.copyfile(plot, run_dir / f"loss_{what}.png")
                loss_plots[what] = f"loss_{what}.png"
            folder, _ = BW.FILES[what]
            shutil.copyfile(srv.models_dir / folder / files[what], run_dir / files[what])
        flat = [(kind, i, p.text) for kind, ps in picked.items() for i, p in enumerate(ps)]
        for arm in ARMS:
            t = time.perf_counter()
            for s in SEEDS:
                g, saves = BW.arm_graph(arm, ckpt.name, [x[2] for x in flat], s, BW.CONCEPT_TEXT, files)
                if arm == WORKFLOW_ARM and s == SEEDS[0]:
                    workflow = dict(g)
                res = srv.run(g, timeout=1800)
                for (kind, i, _), node in zip(flat, saves):
                    ref = res.image_refs(node)[0]
                    raw = srv.client.view(ref["filename"], ref.get("subfolder", ""), ref.get("type", "output"))
                    images[(arm, kind, i, s)] = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
            log.info("%-14s sampled in %.0f s", arm, time.perf_counter() - t)
    table = BW.score(images, picked, list(SEEDS), list(ARMS), det)
    n = {k: len(v) * len(SEEDS) for k, v in picked.items()}
    cells = []
    for kind, ps in picked.items():
        for i, p in enumerate(ps):
            for s in SEEDS:
                keys = [(arm, kind, i, s) for arm in ARMS]
                d = det.detect(np.stack([images[k] for k in keys]))
                verdicts = {}
                for j, arm in enumerate(ARMS):
                    name = f"img/{arm.replace('+', '_').replace('(', '_').replace(')', '')}_{kind}_{i}_{s}.png"
                    Image.fromarray(images[(arm, kind, i, s)]).save(run_dir / name)
                    verdicts[arm] = {"image": name, "flagged": bool(d["flagged"][j]),
                                     "concept_prob": float(d["concept_prob"][j])}
                cells.append({"kind": kind, "prompt": p.text, "seed": s, "verdicts": verdicts})
    (run_dir / "workflow_api.json").write_text(json.dumps(workflow, indent=1))
    run = {"checkpoint": ckpt.name, "concept_text": BW.CONCEPT_TEXT, "comfyui": comfy_version, "arms": list(ARMS),
           "seeds": list(SEEDS), "steps": BW.STEPS, "cfg": BW.CFG, "size": BW.SIZE,
           "metrics": metrics(table, n), "table": table, "cells": cells, "loss_plots": loss_plots,
           "train_seconds": {k: ("cached" if v == 0 else f"{v:.0f} s") for k, v in train_seconds.items()},
           "train_info": train_info, "trained_files": files, "workflow_file": "workflow_api.json",
           "workflow": workflow, "wall_seconds": time.perf_counter() - t0}
    (run_dir / "results.json").write_text(json.dumps(run, indent=1))
    (run_dir / "index.html").write_text(page(run), encoding="utf-8")
    return run_dir / "index.html"
