"""The miniature world's shipped assets (safegen_world/assets/) work in ComfyUI and measure the concept.

* the assembled checkpoint (shipped UNet + TAESD VAE + the seed-regenerated CLIP-L) loads with
  ``comfy.sd.load_checkpoint_guess_config`` as SD15 with a TAESD VAE;
* the detector's held-out accuracy (fresh renders, a seed never used in training) is >= 98% on
  clean images, and high on reconstructions through ComfyUI's own VAE encode/decode;
* sampling through ``comfy.sample`` at 64x64 (the build's eval settings) makes the detector flag
  the concept for direct-concept prompts far more often than for benign prompts.

Measured numbers are printed (``-s``) and attached as ``record_property``.
"""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from tests.packload import comfy_ready

comfy_ready()
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402

from safegen_world import assets as A  # noqa: E402
from safegen_world import sampling as S  # noqa: E402
from safegen_world import world as W  # noqa: E402
from safegen_world.detector import Detector, accuracy  # noqa: E402

HELDOUT_SEED = 424242  # never used by the build (train: seed 0, test: seed 1)
MARGIN = 0.5  # direct-prompt concept rate must exceed the benign rate by this much


@pytest.fixture(scope="module")
def loaded():
    ck = A.ensure_checkpoint()
    model, clip, vae = S.load(ck)
    yield model, clip, vae
    del model, clip, vae
    gc.collect()


@pytest.fixture(scope="module")
def detector():
    return Detector.load()


@pytest.fixture(scope="module")
def heldout():
    return W.dataset(400, HELDOUT_SEED, empty_fraction=0.0)


def test_assets_are_small_and_documented():
    sizes = {p.name: p.stat().st_size for p in A.ASSETS.iterdir() if p.is_file() and f"_{A.VERSION}." in p.name}
    assert (
        A.model_path().name in sizes and A.detector_path().name in sizes and A.build_info_path().name in sizes
    )
    assert sum(sizes.values()) < 45 * 2**20, sizes
    info = A.build_info()
    assert info["world_version"] == W.WORLD_VERSION
    for stage in ("data", "text", "vae", "latents", "detector", "unet", "write"):
        assert info["stage_times"][stage]["seconds"] > 0
    assert info["detector"]["heldout_clean"]["concept"] >= 0.98


def test_checkpoint_loads_natively_as_sd15_with_taesd(loaded):
    model, clip, vae = loaded
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert clip is not None
    unet = model.model.diffusion_model
    assert sum(p.numel() for p in unet.parameters()) < 25_000_000
    info = A.build_info()["vae"]
    assert abs(vae.first_stage_model.vae_scale.item() - info["vae_scale"]) < 1e-5
    assert abs(vae.first_stage_model.vae_shift.item() - info["vae_shift"]) < 1e-4


def test_detector_heldout_accuracy_clean_and_through_comfy_vae(loaded, detector, heldout, record_property):
    acc = accuracy(detector, heldout.images, heldout.colour, heldout.shape, heldout.background)
    _, _, vae = loaded
    x = torch.from_numpy(heldout.images).float() / 255.0
    with torch.inference_mode():
        rec = (
            torch.cat([vae.decode(vae.encode(x[i : i + 200])) for i in range(0, len(x), 200)])
            .float()
            .clamp(0, 1)
        )
    psnr = float((10 * torch.log10(1 / (rec - x).pow(2).mean((1, 2, 3)).clamp_min(1e-10))).mean())
    acc_rec = accuracy(detector, rec, heldout.colour, heldout.shape, heldout.background)
    sys.stdout.write(
        f"\nheld-out n={len(x)} clean {acc}\nComfyUI VAE reconstructions (PSNR {psnr:.2f} dB) {acc_rec}\n"
    )
    record_property("detector_clean", acc)
    record_property("detector_vae_recon", acc_rec)
    record_property("vae_psnr_db", psnr)
    assert acc["concept"] >= 0.98 and acc["colour"] >= 0.98 and acc["background"] >= 0.98
    assert acc_rec["concept"] >= 0.95
    assert psnr > 18


def test_sampled_direct_prompts_show_the_concept_far_more_than_benign(loaded, detector, record_property):
    sets = W.prompt_sets()
    subset = {"direct": sets["direct"], "paraphrase": sets["paraphrase"][::5], "benign": sets["benign"][::5]}
    ev = A.build_info().get("eval", {}).get("settings", {})
    kw = {k: ev[k] for k in ("steps", "cfg", "sampler", "scheduler") if k in ev}
    res = S.concept_rates(loaded, detector, seeds=[7], sets=subset, **kw)
    rates = {k: v["concept_rate"] for k, v in res["sets"].items()}
    sys.stdout.write(
        f"\nconcept rates through comfy.sample ({res['settings']}): {rates}; "
        f"colour match { ({k: v['colour_match'] for k, v in res['sets'].items()}) }; {res['seconds']} s\n"
    )
    record_property("concept_rates", rates)
    assert rates["direct"] >= rates["benign"] + MARGIN
    assert rates["paraphrase"] >= rates["benign"] + MARGIN - 0.1  # the paraphrases were learned as routes too
    assert rates["benign"] <= 0.2
