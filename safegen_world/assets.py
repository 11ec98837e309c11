"""Where the miniature world's trained assets live, and the full SD1 checkpoint assembled from them.

Shipped in ``safegen_world/assets/`` (fp16, small):

* ``world_sd1_<V>.safetensors``: the trained UNet (``model.diffusion_model.*``) and the trained
  TAESD-layout VAE (``first_stage_model.taesd_{en,de}coder.*``, ``vae_scale``/``vae_shift``)
  of an SD1.x checkpoint; no text encoder.
* ``world_detector_<V>.safetensors``: the concept detector (see detector.py).
* ``world_build_<V>.json``: the recipe, seed, every stage's measured time, PSNR, accuracies.

The text encoder is the full-size random CLIP-L that ``tools/tiny_models.py`` regenerates
byte-identically from its seed (246 MiB in fp16: too big to ship); the captions were encoded
through exactly that CLIP during training. ``ensure_checkpoint()`` adds it and writes a complete
checkpoint to ``<repo>/.cache/world/`` that ComfyUI loads natively (``CheckpointLoaderSimple``,
``comfy.sd.load_checkpoint_guess_config``) as SD15 with a TAESD VAE.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .world import WORLD_VERSION

ASSETS = Path(__file__).resolve().parent / "assets"
REPO_ROOT = Path(__file__).resolve().parent.parent
VERSION = f"{WORLD_VERSION}"
CLIP_PREFIX = "cond_stage_model."


def model_path() -> Path:
    return ASSETS / f"world_sd1_{VERSION}.safetensors"


def detector_path() -> Path:
    return ASSETS / f"world_detector_{VERSION}.safetensors"


def build_info_path() -> Path:
    return ASSETS / f"world_build_{VERSION}.json"


def build_info() -> dict:
    import json

    return json.loads(build_info_path().read_text())


def default_cache_dir() -> Path:
    return REPO_ROOT / ".cache" / "world"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def assemble(unet_vae_path, out_path) -> Path:
    """Write ``unet_vae_path`` + the seed-regenerated CLIP-L of tools/tiny_models.py to ``out_path``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tools.tiny_models import ensure as ensure_tiny

    tiny = ensure_tiny("sd1")
    sd = {k: v for k, v in load_file(str(tiny)).items() if k.startswith(CLIP_PREFIX)}
    sd.update(load_file(str(unet_vae_path)))
    with safe_open(str(unet_vae_path), "pt") as fh:
        meta = dict(fh.metadata() or {})
    meta["safegen.world_clip"] = tiny.name
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        save_file(sd, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


def ensure_checkpoint(cache_dir=None, unet_vae_path=None) -> Path:
    """Path of the complete, loadable SD1 checkpoint of the world (built once per asset content)."""
    src = Path(unet_vae_path) if unet_vae_path is not None else model_path()
    if not src.is_file():
        raise FileNotFoundError(f"{src} missing: run .venv/bin/python -m safegen_world.build")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / f"safegen_world_sd1_{VERSION}_{_digest(src)}.safetensors"
    if not out.is_file():
        assemble(src, out)
        for old in cache.glob(f"safegen_world_sd1_{VERSION}_*.safetensors"):  # stale assemblies (~280 MiB)
            if old != out:
                old.unlink(missing_ok=True)
    return out
