"""The Concept Inversion Trainer's CCE objectives on the tiny SD1 model, replayed.

``invert()`` runs one optimiser step with objective ``np`` / ``sld``; every UNet prediction it makes
is recorded (``compat.predict_eps``), and the loss it reports must equal CCE's loss computed by the
independent transcriptions in ``tests/unit/test_inversion_targets.py`` (``ref_np_loss``,
``ref_sld_loss``: np/concept_inversion.py:1004-1008, sld/concept_inversion.py:1032-1098) on those
very predictions. The ``sld`` batch also follows CCE's timestep draw (sorted, distinct, one noise).
"""
import pytest
import torch

from tests.packload import comfy_ready, pack_module
from tests.unit.test_inversion_targets import ref_np_loss, ref_sld_loss, ref_timesteps

comfy_ready()
import comfy.sd  # noqa: E402

from tools.tiny_models import ensure  # noqa: E402

LAT = 8


@pytest.fixture(scope="module")
def tiny():
    mp, clip, *_ = comfy.sd.load_checkpoint_guess_config(str(ensure("sd1")), output_vae=False, output_clip=True,
                                                         embedding_directory=[])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, LAT, LAT, generator=g)
    return mp, clip, latents


def recorded_run(tiny, monkeypatch, **settings):
    mp, clip, latents = tiny
    inv, compat = pack_module("safegen_comfy.inversion"), pack_module("safegen_comfy.compat")
    calls = []
    orig = compat.predict_eps

    def spy(model, x, sigma, cond, pooled, w, h):
        out = orig(model, x, sigma, cond, pooled, w, h)
        calls.append({"x": x.detach().clone(), "sigma": sigma.detach().clone(), "cond": cond.detach().clone(),
                      "out": out.detach().clone()})
        return out

    monkeypatch.setattr(compat, "predict_eps", spy)
    with torch.inference_mode():
        result, fp = inv.invert(mp, clip, latents, steps=1, learning_rate=1e-3, seed=7, template="a photo of {}",
                                negative_text="nudity", guidance_scale=7.5, gradient_accumulation=1, **settings)
    return result, fp, calls


def test_np_loss_equals_cce_on_the_models_predictions(tiny, monkeypatch):
    result, fp, calls = recorded_run(tiny, monkeypatch, objective="np", batch_size=2)
    assert len(calls) == 3  # learned prompt (grad), safety text, empty prompt — one x_t for all three
    text, safety, uncond = calls
    assert torch.equal(text["x"], safety["x"]) and torch.equal(text["x"], uncond["x"])
    assert not torch.equal(safety["cond"], uncond["cond"])
    want = ref_np_loss(uncond["out"], safety["out"], text["out"], 7.5).item()
    assert result.losses[0] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert fp["objective"] == "np" and fp["negative_text"] == "nudity"


def test_sld_loss_equals_cce_on_the_models_predictions(tiny, monkeypatch):
    core = pack_module("safegen_core.inversion")
    result, fp, calls = recorded_run(tiny, monkeypatch, objective="sld", batch_size=1, sld_preset="max",
                                     sld_timestep_count=5, sld_timestep_range=9)
    assert len(calls) == 3
    text, safety, uncond = calls
    k = text["x"].shape[0]
    assert k == 5
    # CCE's draw: after the image index and the noise, the sorted distinct timesteps (sld:985-1011)
    g = pack_module("safegen_core.training").step_generator(7, 1)
    torch.randint(0, 3, (1,), generator=g)
    torch.randn((1, 4, LAT, LAT), generator=g)
    ts = ref_timesteps(g, 9, 5)
    sig = pack_module("safegen_comfy.common").model_sigmas(tiny[0])
    torch.testing.assert_close(text["sigma"], sig[ts].to(text["sigma"].dtype))
    assert bool((text["sigma"][:-1] > text["sigma"][1:]).all())  # noisiest first
    # one image, one noise: x_k - x_j is (σ_k - σ_j)·ε for every pair
    eps = (text["x"][0] - text["x"][-1]) / (text["sigma"][0] - text["sigma"][-1])
    torch.testing.assert_close(text["x"][1], text["x"][-1] + (text["sigma"][1] - text["sigma"][-1]) * eps,
                               rtol=1e-4, atol=1e-4)
    preds = [(uncond["out"][i:i + 1], safety["out"][i:i + 1], text["out"][i:i + 1]) for i in range(k)]
    want = ref_sld_loss(preds, step=0, guidance_scale=7.5).item()  # CCE's SLD (= SLD max), warm-up 0
    assert result.losses[0] == pytest.approx(want, rel=1e-5, abs=1e-7)
    # the momentum over the sorted timesteps matters on these predictions
    assert abs(ref_sld_loss(preds[-1:], step=0).item() - want) > 1e-6 * max(1.0, abs(want))
    assert fp["sld"] == {"preset": "max", "count": 5, "range": 9}
    assert core.OBJECTIVES == ("ldm", "np", "sld")


def test_bad_cce_settings_are_refused(tiny):
    mp, clip, latents = tiny
    inv = pack_module("safegen_comfy.inversion")
    with torch.inference_mode():
        with pytest.raises(ValueError, match="negative_text"):
            inv.invert(mp, clip, latents, steps=1, objective="np", negative_text="")
        with pytest.raises(ValueError, match="one image per micro-batch"):
            inv.invert(mp, clip, latents, steps=1, objective="sld", negative_text="nudity", batch_size=2)
        with pytest.raises(ValueError, match="unknown objective 'guided'"):
            inv.invert(mp, clip, latents, steps=1, objective="guided", negative_text="nudity")
