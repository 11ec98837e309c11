"""`make demo`: SafeGen's defences on a real ComfyUI server it starts, through the HTTP API.

Default (no ``--checkpoint``): the miniature world shipped in ``safegen_world/`` — ESD erases the
world's harmful concept, concept inversion recovers an implicit negative embedding (INE) from the
erased model, and base / erased / erased + text guidance / erased + INE guidance are sampled on the
same prompts and seeds and judged by the world's detector; one page ``demo_out/<time>/index.html``
(``tools/demo_world.py``). Under 3 minutes with the trained files cached in ``.cache/``.

With ``--checkpoint /path/to/sd15.safetensors`` (``make demo CHECKPOINT=…``; add ``UNLEARNED=…`` for a
real ESD/UCE/… release, else a synthetic ESD-x-style partial file is made) the graph
``workflows/api/safe_pipeline.json`` runs on that model: unlearned UNet -> concept inversion on it ->
INE as SLD's safety concept -> NudeNet Safety Check -> report.md in ``--out/<time>/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.comfy_host import ComfyServer  # noqa: E402
from tools.workflows import API_DIR, adapt  # noqa: E402

log = logging.getLogger("safegen.demo")


def make_partial_unlearned(ckpt: Path, out: Path, seed: int = 1) -> Path:
    """An ESD-x-style partial file (cross-attention tensors moved) from a checkpoint's UNet."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    part = {}
    with safe_open(str(ckpt), "pt") as f:
        for k in f.keys():
            if k.startswith("model.diffusion_model.") and ".attn2." in k and k.endswith(".weight"):
                v = f.get_tensor(k).float()
                part[k[len("model.diffusion_model."):]] = (v + 0.5 * v.std() * torch.randn(v.shape, generator=g)).half()
    save_file(part, str(out), metadata={"made_by": "safegen demo", "variant": "esd-x (synthetic)"})
    return out


def _node_of(api, class_type, title_part=""):
    return [n for n, v in api.items() if v["class_type"] == class_type
            and title_part in v.get("_meta", {}).get("title", "")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a real SD1.5/SDXL checkpoint (default: the miniature world demo)")
    ap.add_argument("--unlearned", help="an unlearned UNet file (default: a synthetic ESD-x-style partial file)")
    ap.add_argument("--out", default=str(REPO / "demo_out"), help="folder for the run's images and report")
    ap.add_argument("--workflow", default=str(API_DIR / "safe_pipeline.json"))
    ap.add_argument("--prompt", default=None, help="the user's prompt (default: the workflow's)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="concept inversion steps (--checkpoint runs, default: the workflow's 200); world demo: "
                         "ESD and inversion steps (a smoke run; default 200 each)")
    ap.add_argument("--retrain", action="store_true", help="world demo: train ESD and the INE again")
    ap.add_argument("--per-set", type=int, default=None,
                    help="world demo: prompts per set (direct, paraphrase, benign; default 4)")
    ap.add_argument("--cache", default=None, help="world demo: folder of trained files (default .cache/bench_world)")
    ap.add_argument("--ship-ine", action="store_true",
                    help="world demo: write the INE it used into embeddings/world_red_ine.safetensors")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.checkpoint:
        from tools.demo_world import run_demo
        from tools.demo_world import PER_SET
        page = run_demo(Path(args.out), retrain=args.retrain, per_set=args.per_set or PER_SET,
                        train_steps=args.train_steps, cache=args.cache, ship=args.ship_ine)
        log.info("demo page: %s", page)
        print(f"SafeGen demo: open {page}")  # noqa: T201 - the one line a user needs
        return 0

    run_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="safegen-demo-"))
    ckpt = Path(args.checkpoint).resolve()
    if not ckpt.is_file():
        raise SystemExit(f"checkpoint not found: {ckpt}")
    unl = (Path(args.unlearned).resolve() if args.unlearned
           else make_partial_unlearned(ckpt, work / "demo_esd_x_synthetic.safetensors"))

    api = adapt(json.loads(Path(args.workflow).read_text()), {"ckpt_name": ckpt.name, "unet_name": unl.name},
                small=False)
    trainer = _node_of(api, "SafeGen_ConceptInversionTrainer")
    for n in trainer:
        api[n]["inputs"]["steps"] = args.train_steps or api[n]["inputs"]["steps"]
        api[n]["inputs"]["resume"] = False
    if args.prompt:
        for n in _node_of(api, "CLIPTextEncode", "Prompt"):
            api[n]["inputs"]["text"] = args.prompt

    t0 = time.time()
    with ComfyServer(work / "comfy", log_path=run_dir / "comfyui.log") as srv:
        for src, folder in ((ckpt, "checkpoints"), (unl, "diffusion_models")):
            dst = srv.models_dir / folder / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(src)
        log.info("ComfyUI ready at %s (%.1f s); running %s", srv.url, srv.startup_seconds or 0,
                 Path(args.workflow).name)
        res = srv.run(api, timeout=24 * 3600)
        files = {}
        for nid, out in res.outputs.items():
            ct = api[nid]["class_type"]
            if ct not in ("SaveImage", "PreviewImage"):
                continue  # the check nodes' previews repeat what SaveImage saved
            for k, ref in enumerate(out.get("images", [])):
                label = (api[nid]["inputs"]["filename_prefix"].split("/")[-1] if ct == "SaveImage"
                         else "inversion_loss_plot")
                name = f"{label}_{k}.png"
                srv.client.view_image(ref).save(run_dir / name)
                files.setdefault(label, []).append(name)
        checks = {api[n].get("_meta", {}).get("title", n): res.ui(n).get("safegen_safety", [])
                  for n in _node_of(api, "SafeGen_NudeNetSafetyCheck")}
        info = {"loader": [t for n in _node_of(api, "SafeGen_UnlearnedUNetLoader") for t in res.ui(n).get("text", [])],
                "trainer": [t for n in trainer for t in res.ui(n).get("text", [])]}
        import shutil
        for emb in (srv.models_dir / "embeddings").glob("*.safetensors"):
            shutil.copy2(emb, run_dir / emb.name)  # the trained INE outlives the server's temp folder
            files.setdefault("embedding", []).append(emb.name)
    elapsed = time.time() - t0

    import numpy as np
    from PIL import Image
    diff = float("nan")
    if "pipeline_safe" in files and "pipeline_base" in files:
        a = np.asarray(Image.open(run_dir / files["pipeline_safe"][0]), dtype=np.float32)
        b = np.asarray(Image.open(run_dir / files["pipeline_base"][0]), dtype=np.float32)
        diff = float(np.abs(a - b).mean())
    lines = [
        "# SafeGen demo: the safe pipeline", "",
        f"- checkpoint: `{ckpt}`",
        f"- unlearned file: `{unl.name}`{'' if args.unlearned else ' (synthetic ESD-x-style partial file)'}",
        f"- workflow: `{Path(args.workflow).name}` through ComfyUI's HTTP API (POST /prompt + websocket); "
        f"open `workflows/safe_pipeline.json` in ComfyUI to see it",
        f"- wall time (server start to last image): {elapsed:.1f} s", "",
        "Steps: unlearned UNet -> concept inversion on it (concept images drawn by the base model) -> "
        "implicit negative embedding as SLD's safety concept -> NudeNet Safety Check on the safe image "
        "and on the base model's image (same seed).", "",
        "## Unlearned UNet Loader", "", "```", *info["loader"], "```", "",
        "## Concept Inversion Trainer", "", "```", *info["trainer"], "```", "",
        "## NudeNet Safety Check", "",
        "| image | unsafe | max score | counted detections | threshold |", "|---|---|---|---|---|",
    ]
    for title, rows in checks.items():
        for r in rows:
            found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in r["counted"]) or "-"
            lines.append(f"| {title} #{r['index']} | {r['unsafe']} | {r['max_score']:.3f} | {found} | {r['threshold']} |")
    lines += ["", "## Images", ""]
    lines += [f"- {k}: " + " ".join(f"![{n}]({n})" if n.endswith(".png") else f"`{n}`" for n in v)
              for k, v in sorted(files.items())]
    lines += ["", f"Mean absolute pixel difference safe pipeline vs base model (same seed): {diff:.2f} / 255", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    (run_dir / "results.json").write_text(json.dumps({"checks": checks, "info": info, "files": files,
                                                      "seconds": elapsed}, indent=1))
    print(f"demo report: {run_dir / 'report.md'}")  # noqa: T201 - the CLI's one line of output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
