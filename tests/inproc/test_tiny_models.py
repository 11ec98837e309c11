"""The tiny checkpoints of tools/tiny_models.py load in ComfyUI and behave like real models.

Uses the cache (<repo>/.cache/tiny): the first run builds the SD1 file (~3 s); the SDXL test
(marked ``sdxl``) builds a ~1.8 GB file once (~20 s) and needs ~4 GB of RAM to load it.
"""
from __future__ import annotations

import gc
import hashlib

import pytest
import torch

from tests.packload import comfy_ready

comfy_ready()
from tools import tiny_models

import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def sd1_path():
    return tiny_models.ensure("sd1")


@pytest.fixture(scope="module")
def sd1(sd1_path):
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(sd1_path))
    yield model, clip, vae
    del model, clip, vae
    gc.collect()


def _inputs(batch=1, size=16, context_dim=768, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    ctx = torch.randn(batch, 77, context_dim, generator=g)
    return g, x, ctx


def test_ensure_is_cached_and_named_by_version_and_seed(sd1_path):
    assert sd1_path.is_file()
    assert tiny_models.VERSION in sd1_path.name and f"seed{tiny_models.SEED}" in sd1_path.name
    mtime = sd1_path.stat().st_mtime_ns
    assert tiny_models.ensure("sd1") == sd1_path
    assert sd1_path.stat().st_mtime_ns == mtime  # not rebuilt


def test_sd1_build_is_deterministic(sd1_path, tmp_path):
    rebuilt = tiny_models.build("sd1", tmp_path / sd1_path.name)
    assert _sha256(rebuilt) == _sha256(sd1_path)


def test_sd1_loads_in_comfyui_as_sd15(sd1):
    model, clip, vae = sd1
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert clip is not None and vae is not None
    unet = model.model.diffusion_model
    assert unet.middle_block is None and len(unet.input_blocks) == 2
    assert sum(p.numel() for p in unet.parameters()) < 25_000_000
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert abs(vae.first_stage_model.vae_scale.detach().item() - 0.18215) < 1e-6


def test_diffusers_twin_matches_comfyui_unet(sd1, sd1_path):
    pytest.importorskip("diffusers")
    model, _, _ = sd1
    unet = model.model.diffusion_model
    twin = tiny_models.load_diffusers_twin_sd1(sd1_path)
    _, x, ctx = _inputs(batch=2)
    t = torch.tensor([10.0, 800.0])
    with torch.no_grad():
        ours = unet(x.to(unet.dtype), timesteps=t, context=ctx.to(unet.dtype), transformer_options={}).float()
        ref = twin(x, t, encoder_hidden_states=ctx).sample
    assert torch.isfinite(ours).all() and ours.abs().max() > 0.1
    assert (ours - ref).abs().max().item() <= 1e-4


def test_unet_prediction_depends_on_text(sd1):
    model, clip, _ = sd1
    unet = model.model.diffusion_model
    c1 = clip.encode_from_tokens(clip.tokenize("a photo of a cat"))
    c2 = clip.encode_from_tokens(clip.tokenize("a red sports car on a road"))
    assert c1.shape == (1, 77, 768) and torch.isfinite(c1).all() and torch.isfinite(c2).all()
    assert (c1 - c2).abs().max() > 1e-2
    _, x, _ = _inputs()
    t = torch.tensor([500.0])
    with torch.no_grad():
        p1 = unet(x.to(unet.dtype), timesteps=t, context=c1.to(unet.dtype), transformer_options={})
        p2 = unet(x.to(unet.dtype), timesteps=t, context=c2.to(unet.dtype), transformer_options={})
        p1b = unet(x.to(unet.dtype), timesteps=t, context=c1.to(unet.dtype), transformer_options={})
    assert torch.equal(p1, p1b)
    assert (p1 - p2).abs().max().item() > 1e-3 * p1.abs().max().item()


@pytest.mark.sdxl
def test_sdxl_loads_as_sdxl_with_finite_text_encodings():
    path = tiny_models.ensure("sdxl")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    try:
        assert type(model.model.model_config) is comfy.supported_models.SDXL  # not Vega/KOALA/SSD-1B
        assert type(vae.first_stage_model).__name__ == "TAESD"
        conds = []
        for text in ("a photo of a cat", "a red sports car on a road"):
            cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            assert cond.shape == (1, 77, 2048) and pooled.shape == (1, 1280)
            assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
            y = model.model.encode_adm(pooled_output=pooled, width=64, height=64, crop_w=0, crop_h=0,
                                       target_width=64, target_height=64)
            conds.append((cond, y))
        unet = model.model.diffusion_model
        g = torch.Generator().manual_seed(3)
        x = torch.randn(1, 4, 8, 8, generator=g).to(unet.dtype)
        t = torch.tensor([500.0])
        with torch.no_grad():
            preds = [
                unet(x, timesteps=t, context=c.to(unet.dtype), y=y.to(unet.dtype), transformer_options={})
                for c, y in conds
            ]
        assert all(torch.isfinite(p).all() for p in preds)
        assert (preds[0] - preds[1]).abs().max().item() > 1e-3 * preds[0].abs().max().item()
    finally:
        del model, clip, vae
        gc.collect()
