"""Where the miniature world's trained assets live, and the full SD1 checkpoint assembled from them.

Shipped in ``safegen_world/assets/`` (fp16, small):

* ``world_sd1_<V>.safetensors``: the trained UNet (``model.diffusion_model.*``) and the trained
  TAESD-layout VAE (``first_stage_model.taesd_{en,de}coder.*``, ``vae_scale``/``vae_shift``)
  of an SD1.x checkpoint; no text encoder.
* ``world_detector_<V>.safetensors``: the concept detector (see detector.py).
* ``world_build_<V>.json``: the recipe, seed, every stage's measured time, PSNR, accuracies.

The text encoder starts from the full-size random CLIP-L that ``tools/tiny_models.py`` regenerates
byte-identically from its seed (246 MiB in fp16: too big to ship).

* w1: that CLIP as it is; the captions were encoded through exactly it during training.
* w2: the *world CLIP*: the same CLIP with every encoder layer's residual branches switched off
  (``self_attn.out_proj`` and ``mlp.fc2`` zero, so each layer passes its input through exactly) and the
  token-embedding rows of the world's vocabulary plus the final layer norm trained with the UNet.
  Each token's conditioning is then ``final_layer_norm(token_row + position_row)``: a word means the
  same alone as in a caption (issue 18). The asset carries only what was trained
  (``WORLD_CLIP_IDS``/``WORLD_CLIP_ROWS`` and the final layer norm under its checkpoint key).

``ensure_checkpoint()`` adds the text encoder and writes a complete checkpoint to
``<repo>/.cache/world/`` that ComfyUI loads natively (``CheckpointLoaderSimple``,
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
TEXT_MODEL = CLIP_PREFIX + "transformer.text_model."
TOKEN_EMBEDDING = TEXT_MODEL + "embeddings.token_embedding.weight"
FINAL_LN = TEXT_MODEL + "final_layer_norm."
# the world CLIP's trained token rows (w2): ids [V] int64 and rows [V, 768]; not checkpoint keys
WORLD_CLIP_IDS = "safegen_world.clip.token_ids"
WORLD_CLIP_ROWS = "safegen_world.clip.token_rows"
# the residual branches of a CLIP encoder layer: zero => the layer is the identity
RESIDUAL_OUTPUTS = ("self_attn.out_proj.", "mlp.fc2.")


def model_path(version: str = VERSION) -> Path:
    return ASSETS / f"world_sd1_{version}.safetensors"


def detector_path(version: str = VERSION) -> Path:
    return ASSETS / f"world_detector_{version}.safetensors"


def build_info_path(version: str = VERSION) -> Path:
    return ASSETS / f"world_build_{version}.json"


def build_info(version: str = VERSION) -> dict:
    import json

    return json.loads(build_info_path(version).read_text())


def world_clip(clip_sd: dict, trained: dict) -> dict:
    """The w2 text encoder: ``clip_sd`` (checkpoint keys of the seed CLIP) with identity layers and the
    trained token rows / final layer norm of ``trained`` (an asset's tensors) put in. Returns new tensors."""
    import torch

    out = dict(clip_sd)
    for k, v in clip_sd.items():
        if ".encoder.layers." in k and any(f".{r}" in k for r in RESIDUAL_OUTPUTS):
            out[k] = torch.zeros_like(v)
    table = clip_sd[TOKEN_EMBEDDING].clone()
    ids = trained[WORLD_CLIP_IDS].long()
    table[ids] = trained[WORLD_CLIP_ROWS].to(table.dtype)
    out[TOKEN_EMBEDDING] = table
    for name in ("weight", "bias"):
        out[FINAL_LN + name] = trained[FINAL_LN + name].to(clip_sd[FINAL_LN + name].dtype)
    return out


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
    asset = load_file(str(unet_vae_path))
    if WORLD_CLIP_IDS in asset:  # w2: the world CLIP
        sd = world_clip(sd, asset)
        asset = {k: v for k, v in asset.items() if not k.startswith((CLIP_PREFIX, "safegen_world."))}
    sd.update(asset)
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


def ensure_checkpoint(cache_dir=None, unet_vae_path=None, version: str = VERSION) -> Path:
    """Path of the complete, loadable SD1 checkpoint of the world (built once per asset content)."""
    src = Path(unet_vae_path) if unet_vae_path is not None else model_path(version)
    if not src.is_file():
        raise FileNotFoundError(f"{src} missing: run .venv/bin/python -m safegen_world.build")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / f"safegen_world_sd1_{version}_{_digest(src)}.safetensors"
    if not out.is_file():
        assemble(src, out)
        for old in cache.glob(f"safegen_world_sd1_{version}_*.safetensors"):  # stale assemblies (~280 MiB)
            if old != out:
                old.unlink(missing_ok=True)
    return out
