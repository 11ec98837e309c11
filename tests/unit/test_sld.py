"""SLD guidance (safegen_core.sld) against diffusers' StableDiffusionPipelineSafe.

The pipeline is built offline from tiny random components; its UNet is replaced by a function
that records its inputs and returns predetermined random predictions, and ``scheduler.step`` is
wrapped to capture the noise prediction the pipeline actually feeds it.  The same (uncond, cond,
safety) sequence is then replayed through ``sld_guidance`` with a fresh ``SLDState``.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import pytest
import torch

from safegen_core.sld import (
    DEFAULT_SAFETY_CONCEPT,
    SLD_PRESETS,
    SLDParams,
    SLDState,
    sigma_to_step_index,
    sld_cfg_from_denoised,
    sld_guidance,
    sld_safety_term,
)
from tools.tiny_models import comfyui_dir

# ComfyUI's own SD1 tokenizer files (the one ComfyUI locator: $SAFEGEN_COMFYUI or <repo>/.comfyui)
TOKENIZER_DIR = comfyui_dir() / "comfy" / "sd1_tokenizer"
# The reference comparisons never skip silently: a missing reference is a failure. Setting
# SAFEGEN_ALLOW_REFERENCE_SKIP=1 turns that into a skip with its reason printed, except when
# CI is set (a skip there would hide an untested guidance): then it is still a failure.
ALLOW_SKIP_ENV = "SAFEGEN_ALLOW_REFERENCE_SKIP"
STEPS = 20
CFG = 7.5
LATENT = (4, 8, 8)
MAX_DIFF: dict = {}


def reference_unavailable(what: str) -> None:
    """The diffusers reference cannot run: fail with ``what`` (or, when allowed, skip loudly)."""
    msg = (f"SLD reference comparison cannot run: {what}. diffusers comes from requirements-dev.txt, "
           f"transformers and the tokenizer from ComfyUI (tools/provision.sh, or SAFEGEN_COMFYUI + "
           f"SAFEGEN_PYTHON from tools/provision_compat.sh)")
    if os.environ.get(ALLOW_SKIP_ENV) == "1" and not os.environ.get("CI"):
        print(f"\nSKIPPING ({ALLOW_SKIP_ENV}=1): {msg}", file=sys.stderr)  # noqa: T201
        pytest.skip(msg)
    pytest.fail(msg + ("" if not os.environ.get("CI") else " [CI is set: a skip here is a failure]"),
                pytrace=False)


def require_module(name: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install raising something else
        reference_unavailable(f"`import {name}` failed ({type(exc).__name__}: {exc})")


@pytest.fixture(scope="module")
def safe_pipe():
    require_module("diffusers")
    transformers = require_module("transformers")
    if not (TOKENIZER_DIR / "vocab.json").is_file():
        reference_unavailable(f"no ComfyUI SD1 tokenizer at {TOKENIZER_DIR} (ComfyUI dir {comfyui_dir()})")
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        layers_per_block=1, mid_block_type=None, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32, sample_size=8,
    )
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    )).eval()
    # ComfyUI's tokenizer_config says model_max_length 8192 (ComfyUI chunks itself); SD1 uses 77.
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipelineSafe(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_concept == DEFAULT_SAFETY_CONCEPT
    return pipe


def _make_predictions(batch: int, steps: int, seed: int):
    """Per step: (uncond, cond, safety), each (batch, *LATENT), with |cond - safety| spread over
    several orders of magnitude so the clamp (|d| * sS < 1 and >= 1) and the threshold both act."""
    g = torch.Generator().manual_seed(seed)
    seq = []
    for _ in range(steps):
        u = torch.randn((batch, *LATENT), generator=g)
        c = u + 0.5 * torch.randn((batch, *LATENT), generator=g)
        mag = 10.0 ** (-4.0 * torch.rand((batch, *LATENT), generator=g))
        s = c + torch.randn((batch, *LATENT), generator=g) * mag
        seq.append((u, c, s))
    return seq


def _run_pipeline(pipe, prompts, preds, params: SLDParams, cfg=CFG, steps=STEPS):
    """Run the diffusers pipeline with a fake UNet; return (captured noise_pred per step, UNet calls)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    calls = []
    batch = len(prompts)

    def fake_forward(sample, timestep, encoder_hidden_states=None, **kwargs):
        i = len(calls)
        calls.append({"sample": sample.clone(), "t": timestep, "ehs": encoder_hidden_states.clone()})
        u, c, s = preds[i]
        n = sample.shape[0] // batch
        out = torch.cat([u, c, s][:n])
        return UNet2DConditionOutput(sample=out.to(sample.dtype))

    captured = []
    orig_step = pipe.scheduler.step

    def step_wrapper(model_output, timestep, sample, *args, **kwargs):
        captured.append(model_output.detach().clone())
        return orig_step(model_output, timestep, sample, *args, **kwargs)

    pipe.unet.forward = fake_forward
    pipe.scheduler.step = step_wrapper
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe(
                prompt=prompts, height=8, width=8, num_inference_steps=steps, guidance_scale=cfg,
                generator=torch.Generator().manual_seed(1), output_type="np", **params.to_diffusers_kwargs(),
            )
    finally:
        del pipe.unet.forward
        del pipe.scheduler.step
    return captured, calls


def _replay(preds, params, cfg=CFG, n_steps=None):
    state = SLDState()
    return [sld_guidance(u, c, s, i, params, state, cfg, n_steps) for i, (u, c, s) in enumerate(preds)]


@pytest.mark.parametrize("preset", ["weak", "medium", "strong"])
def test_preset_warmup_at_50_steps_equals_diffusers_default_run(safe_pipe, preset):
    """At diffusers' own 50 steps a preset's warm-up (a share of the run) is its step index exactly."""
    params = SLD_PRESETS[preset]
    preds = _make_predictions(1, 50, seed=40 + len(preset))
    captured, _ = _run_pipeline(safe_pipe, ["a photo of a cat"], preds, params, steps=50)
    ours = _replay(preds, params, n_steps=50)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, captured)) <= 1e-5
    plain = [u + CFG * (c - u) for (u, c, _) in preds]
    first_sld = next(i for i in range(50) if not torch.equal(ours[i], plain[i]))
    assert first_sld == params.warmup_steps == params.warmup(50)


@pytest.mark.parametrize("n_steps", [20, 30, 50])
def test_preset_warmup_is_the_reference_share_of_the_run(n_steps):
    for name, p in SLD_PRESETS.items():
        share = p.warmup_steps / 50  # diffusers' default num_inference_steps
        assert abs(p.warmup(n_steps) - share * n_steps) <= 0.5 + 1e-9, (name, n_steps)
    assert SLD_PRESETS["medium"].warmup(20) == 4 and SLD_PRESETS["weak"].warmup(20) == 6
    # custom values stay absolute
    custom = SLDParams(warmup_steps=10)
    assert custom.warmup(20) == custom.warmup(50) == custom.warmup(None) == 10


def test_momentum_advances_once_per_step():
    """A sampler evaluating twice per step (Heun) calls with the same step index twice: the second
    call uses the momentum the step started with and does not advance it."""
    params = SLDParams(warmup_steps=0, guidance_scale=200.0, threshold=0.0, momentum_scale=0.5,
                       momentum_beta=0.6)
    preds = _make_predictions(1, 6, seed=21)
    once = SLDState()
    ref_mom = []
    for i, (u, c, s) in enumerate(preds[:3]):
        sld_safety_term(u, c, s, i, params, once)
        ref_mom.append(once.momentum.clone())
    twice = SLDState()
    for i in range(3):
        u, c, s = preds[i]
        first = sld_safety_term(u, c, s, i, params, twice)
        assert torch.equal(twice.momentum, ref_mom[i])
        u2, c2, s2 = preds[3 + i]  # another evaluation inside step i
        start = twice.start.clone()
        second = sld_safety_term(u2, c2, s2, i, params, twice)
        assert torch.equal(twice.momentum, ref_mom[i])  # not advanced
        # the second evaluation's term is built on the momentum at the start of the step
        fresh = SLDState()
        fresh.momentum = start
        assert torch.equal(second, sld_safety_term(u2, c2, s2, i, params, fresh))
        assert not torch.equal(first, second)
    assert twice.calls == 3 and twice.evals == 6


@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_diffusers_pipeline(safe_pipe, preset, batch):
    params = SLD_PRESETS[preset]
    prompts = ["a photo of a cat", "a painting of a house"][:batch]
    preds = _make_predictions(batch, STEPS, seed=100 + 7 * batch + len(preset))
    captured, calls = _run_pipeline(safe_pipe, prompts, preds, params)
    assert len(captured) == STEPS and len(calls) == STEPS
    # three conditions per image were evaluated: uncond, prompt, safety concept
    assert calls[0]["sample"].shape[0] == 3 * batch
    assert calls[0]["ehs"].shape[0] == 3 * batch
    assert not torch.equal(calls[0]["ehs"][batch], calls[0]["ehs"][2 * batch])
    ours = _replay(preds, params)
    diffs = [float((a - b).abs().max()) for a, b in zip(ours, captured)]
    MAX_DIFF[(preset, batch)] = max(diffs)
    assert max(diffs) <= 1e-5, (preset, batch, diffs)
    # the safety term really acted after warm-up (otherwise the comparison proves little)
    plain = [u + CFG * (c - u) for (u, c, _) in preds]
    last = STEPS - 1
    assert float((captured[last] - plain[last]).abs().max()) > 1e-3
    if params.warmup_steps > 0:
        assert torch.equal(captured[0], plain[0]) or float((captured[0] - plain[0]).abs().max()) <= 1e-6


def test_batch_images_have_independent_momentum():
    params = SLD_PRESETS["strong"]
    preds = _make_predictions(2, 12, seed=5)
    together = _replay(preds, params)
    for k in range(2):
        alone = _replay([(u[k:k + 1], c[k:k + 1], s[k:k + 1]) for (u, c, s) in preds], params)
        for a, b in zip(alone, together):
            assert torch.equal(a[0], b[k])


def test_disabled_guidance_with_pipeline_is_plain_cfg(safe_pipe):
    """sld_guidance_scale <= 1: diffusers runs two conditions only, plain CFG; so do we."""
    params = SLDParams(warmup_steps=0, guidance_scale=0.0, threshold=0.01, momentum_scale=0.3,
                       momentum_beta=0.4)
    preds = _make_predictions(1, STEPS, seed=9)
    captured, calls = _run_pipeline(safe_pipe, ["a cat"], preds, params)
    assert calls[0]["sample"].shape[0] == 2
    ours = _replay(preds, params)
    for a, b in zip(ours, captured):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["warmup_past_end", "scale_zero", "scale_one"])
def test_plain_cfg_exactly(case):
    preds = _make_predictions(2, 10, seed=3)
    b = SLD_PRESETS["max"]
    params = {
        "warmup_past_end": SLDParams(10, b.guidance_scale, b.threshold, b.momentum_scale, b.momentum_beta),
        "scale_zero": SLDParams(0, 0.0, b.threshold, b.momentum_scale, b.momentum_beta),
        "scale_one": SLDParams(0, 1.0, b.threshold, b.momentum_scale, b.momentum_beta),
    }[case]
    state = SLDState()
    for i, (u, c, s) in enumerate(preds):
        out = sld_guidance(u, c, s, i, params, state, CFG)
        assert torch.equal(out, u + CFG * (c - u))
    if case == "warmup_past_end":
        assert state.momentum is not None and float(state.momentum.abs().max()) > 0  # built during warm-up
    else:
        assert state.momentum is None


def test_cfg_not_above_one_returns_cond():
    u, c, s = _make_predictions(1, 1, seed=4)[0]
    assert torch.equal(sld_guidance(u, c, s, 5, SLD_PRESETS["max"], SLDState(), 1.0), c)


def test_safety_term_consistent_with_guidance():
    params = SLD_PRESETS["medium"]
    preds = _make_predictions(2, 15, seed=11)
    st_a, st_b = SLDState(), SLDState()
    for i, (u, c, s) in enumerate(preds):
        term = sld_safety_term(u, c, s, i, params, st_a)
        full = sld_guidance(u, c, s, i, params, st_b, CFG)
        assert torch.equal(full, u + CFG * ((c - u) - term)) or i < params.warmup_steps
        if i < params.warmup_steps:
            assert torch.equal(term, torch.zeros_like(term))
            assert torch.equal(full, u + CFG * (c - u))
        assert torch.equal(st_a.momentum, st_b.momentum)


@pytest.mark.parametrize("per_sample_sigma", [False, True])
def test_kdiffusion_wrapper_matches_eps_version(per_sample_sigma):
    params = SLD_PRESETS["strong"]
    preds = [tuple(t.double() for t in p) for p in _make_predictions(2, 10, seed=21)]
    sigmas = torch.linspace(14.6, 0.03, 10, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    st_eps, st_x0 = SLDState(), SLDState()
    worst = 0.0
    for i, (u, c, s) in enumerate(preds):
        sig = sigmas[i]
        sig_arg = sig.repeat(2) if per_sample_sigma else float(sig)
        x = torch.randn(u.shape, generator=g, dtype=torch.float64) * float(sig)
        d_u, d_c, d_s = x - sig * u, x - sig * c, x - sig * s
        out = sld_cfg_from_denoised(x, d_u, d_c, d_s, sig_arg, i, params, st_x0, CFG)
        ref = x - sig * sld_guidance(u, c, s, i, params, st_eps, CFG)
        worst = max(worst, float((out - ref).abs().max()))
    MAX_DIFF[("kdiff", per_sample_sigma)] = worst
    assert worst <= 1e-8
    assert torch.allclose(st_x0.momentum, st_eps.momentum, atol=1e-10)


def test_kdiffusion_wrapper_float32_and_distinct_sigmas():
    """Per-sample sigmas that differ: each image converted with its own sigma."""
    params = SLD_PRESETS["medium"]
    u, c, s = _make_predictions(2, 1, seed=8)[0]
    sig = torch.tensor([2.0, 0.5])
    x = torch.randn(u.shape, generator=torch.Generator().manual_seed(1))
    sb = sig.view(2, 1, 1, 1)
    out = sld_cfg_from_denoised(x, x - sb * u, x - sb * c, x - sb * s, sig, 12, params, SLDState(), CFG)
    eps_u, eps_c, eps_s = ((x - (x - sb * t)) / sb for t in (u, c, s))
    ref = x - sb * sld_guidance(eps_u, eps_c, eps_s, 12, params, SLDState(), CFG)
    assert float((out - ref).abs().max()) <= 1e-5


def test_sigma_zero_falls_back_to_plain_cfg():
    u, c, s = _make_predictions(1, 1, seed=1)[0]
    x = torch.randn_like(u)
    out = sld_cfg_from_denoised(x, u, c, s, 0.0, 3, SLD_PRESETS["max"], SLDState(), CFG)
    assert torch.allclose(out, u + (c - u) * CFG)


def test_sigma_to_step_index():
    sigmas = torch.tensor([14.6, 7.0, 3.1, 1.2, 0.4, 0.0])
    assert [sigma_to_step_index(float(v), sigmas) for v in sigmas[:-1]] == [0, 1, 2, 3, 4]
    assert sigma_to_step_index(torch.tensor([3.0, 3.0]), sigmas) == 2
    assert sigma_to_step_index(6.9, sigmas.tolist()) == 1
    assert sigma_to_step_index(100.0, sigmas) == 0


def test_presets_values():
    assert SLD_PRESETS["weak"] == SLDParams(15, 20, 0.0, 0.0, 0.0, 15 / 50)
    assert SLD_PRESETS["medium"] == SLDParams(10, 1000, 0.01, 0.3, 0.4, 10 / 50)
    assert SLD_PRESETS["strong"] == SLDParams(7, 2000, 0.025, 0.5, 0.7, 7 / 50)
    assert SLD_PRESETS["max"] == SLDParams(0, 5000, 1.0, 0.5, 0.7, 0.0)
    # diffusers' own presets are the reference: never skipped silently
    SafetyConfig = require_module("diffusers.pipelines.deprecated.stable_diffusion_safe").SafetyConfig
    for name, cfg in {"weak": SafetyConfig.WEAK, "medium": SafetyConfig.MEDIUM, "strong": SafetyConfig.STRONG,
                      "max": SafetyConfig.MAX}.items():
        assert SLD_PRESETS[name].to_diffusers_kwargs() == cfg


def test_report_max_diffs(capsys):
    # Runs last in file order; prints the measured maxima for the report (-s or -rA shows them).
    if MAX_DIFF:
        with capsys.disabled():
            print("\nSLD max |ours - reference|:", {str(k): f"{v:.3g}" for k, v in MAX_DIFF.items()})
