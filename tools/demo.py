"""`make demo`: start a real ComfyUI server, run the pack's example workflow through its API,
write the images and a short report into a folder, and print where it is.

Without ``--checkpoint`` a tiny SD1.5-shaped checkpoint is built (random weights: the images
are noise, the point is the pipeline), and an ESD-x-style partial unlearned file is made from
it. With ``--checkpoint /path/to/sd15.safetensors`` (and optionally ``--unlearned FILE``, e.g.
an ESD/UCE release) the same workflow runs on the real model.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a real SD1.5/SDXL checkpoint (default: build a tiny SD1.5-shaped one)")
    ap.add_argument("--unlearned", help="an unlearned UNet file (default: a synthetic ESD-x-style partial file)")
    ap.add_argument("--out", default=str(REPO / "demo_out"), help="folder for the run's images and report")
    ap.add_argument("--workflow", default=str(REPO / "workflows" / "api" / "txt2img_unlearned.json"))
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: workflow's; 4 on tiny)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    run_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="safegen-demo-"))
    tiny = not args.checkpoint
    if tiny:
        from tools.tiny_models import ensure
        ckpt = Path(ensure("sd1"))
    else:
        ckpt = Path(args.checkpoint).resolve()
    unl = Path(args.unlearned).resolve() if args.unlearned else make_partial_unlearned(ckpt, work / "demo_esd_x.safetensors")

    wf = json.loads(Path(args.workflow).read_text())
    size = 64 if tiny else None
    for node in wf.values():
        i = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            i["ckpt_name"] = ckpt.name
        if node["class_type"] == "SafeGen_UnlearnedUNetLoader":
            i["unet_name"] = unl.name
        if node["class_type"] == "EmptyLatentImage" and size:
            i["width"] = i["height"] = size
        if node["class_type"] == "KSampler" and (args.steps or tiny):
            i["steps"] = args.steps or 4

    t0 = time.time()
    with ComfyServer(work / "comfy", log_path=run_dir / "comfyui.log") as srv:
        for src, folder in ((ckpt, "checkpoints"), (unl, "diffusion_models")):
            dst = srv.models_dir / folder / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(src)
        log.info("ComfyUI ready at %s (%.1f s)", srv.url, srv.startup_seconds or 0)
        res = srv.run(wf, timeout=3600)
        imgs = {}
        for nid, out in res.outputs.items():
            for k, ref in enumerate(out.get("images", [])):
                name = f"{ref['filename']}"
                srv.client.view_image(ref).save(run_dir / name)
                imgs.setdefault(wf[nid]["inputs"].get("filename_prefix", nid), []).append(name)
        loader_info = next((res.ui(n).get("text", [""])[0] for n, v in wf.items()
                            if v["class_type"] == "SafeGen_UnlearnedUNetLoader" and res.ui(n)), "")
    elapsed = time.time() - t0

    import numpy as np
    from PIL import Image
    arrays = {k: np.asarray(Image.open(run_dir / v[0]), dtype=np.float32) for k, v in imgs.items()}
    keys = sorted(arrays)
    diff = float(np.abs(arrays[keys[0]] - arrays[keys[-1]]).mean()) if len(keys) == 2 else float("nan")
    report = [
        "# SafeGen demo run", "",
        f"- checkpoint: `{ckpt}`{' (tiny, random weights: images are noise)' if tiny else ''}",
        f"- unlearned file: `{unl.name}`",
        f"- workflow: `{Path(args.workflow).name}` through ComfyUI's HTTP API (POST /prompt + websocket)",
        f"- wall time (server start to last image): {elapsed:.1f} s",
        "", "## Unlearned UNet Loader", "", "```", str(loader_info), "```", "",
        "## Images", "",
    ] + [f"- {k}: " + ", ".join(f"![{n}]({n})" for n in v) for k, v in imgs.items()] + [
        "", f"Mean absolute pixel difference unlearned vs base (same seed): {diff:.2f} / 255", ""]
    (run_dir / "report.md").write_text("\n".join(report))
    print(f"demo report: {run_dir / 'report.md'}")  # noqa: T201 - the CLI's one line of output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
