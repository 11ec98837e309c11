"""Build API-format ComfyUI graphs in tests and read their saved outputs."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from tools.workflows import Graph, Node, Out  # noqa: F401  (one graph builder for tools and tests)


def install(server, kind_or_path, folder: str = "checkpoints", name: str | None = None) -> str:
    """Symlink a file (or a tiny checkpoint kind 'sd1'/'sdxl') into the server's models/<folder>."""
    if kind_or_path in ("sd1", "sdxl"):
        from tools.tiny_models import ensure
        src = Path(ensure(kind_or_path))
    else:
        src = Path(kind_or_path)
    name = name or src.name
    dst = Path(server.models_dir) / folder / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src.resolve(), dst)
    return name


def txt2img(g: Graph, model, clip, seed=7, steps=3, text="a photo of a cat", negative="", width=64, height=64,
            cfg=5.0, prefix="t"):
    """KSampler branch ending in SaveLatent; returns the SaveLatent node id."""
    pos = g.add("CLIPTextEncode", clip=clip, text=text)
    neg = g.add("CLIPTextEncode", clip=clip, text=negative)
    lat = g.add("EmptyLatentImage", width=width, height=height, batch_size=1)
    ks = g.add("KSampler", model=model, positive=pos[0], negative=neg[0], latent_image=lat[0], seed=seed,
               steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal", denoise=1.0)
    return g.add("SaveLatent", samples=ks[0], filename_prefix=f"safegen_test/{prefix}")


def latent(server, result, node_id) -> torch.Tensor:
    """The tensor a SaveLatent node wrote in that run."""
    ref = result.ui(node_id)["latents"][0]
    path = Path(server.output_dir) / ref.get("subfolder", "") / ref["filename"]
    return load_file(str(path))["latent_tensor"]
