"""CCE's concept-inversion targets (NP and SLD) vs an independent transcription of the reference.

Reference: NYU-DICE-Lab/circumventing-concept-erasure @ bb7034b7dfe30beeee73b5a61f50ed6938a4daf1,
``np/concept_inversion.py:1004-1008`` and ``sld/concept_inversion.py:985-1011, 1032-1098``.
The ``ref_*`` functions below are transcribed from that text (same variable names, same statement
order, own loop and momentum) and do not call ``safegen_core.inversion``. They are fed "replayed" UNet
predictions: random tensors standing for ε_∅ (""), ε_S (safety concept) and ε(c*) at each timestep.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from safegen_core import inversion as INV

SHAPE = (1, 4, 8, 8)


# ------------------------------------------------------------------ reference transcriptions (CCE text)
def ref_np_loss(model_pred_uncond, model_pred_neg, model_pred_text, guidance_scale):
    # np/concept_inversion.py:1004-1008 (non-i2p branch)
    model_target = model_pred_uncond + guidance_scale * (model_pred_neg - model_pred_uncond)
    model_pred = model_pred_neg + guidance_scale * (model_pred_text - model_pred_neg)
    return F.mse_loss(model_pred.float(), model_target.float(), reduction="mean")


def ref_sld_loss(preds_per_t, step, guidance_scale=7.5, sld_warmup_steps=0, sld_guidance_scale=5000,
                 sld_threshold=1.0, sld_momentum_scale=0.5, sld_mom_beta=0.7):
    """sld/concept_inversion.py:1032-1098 (non-i2p). ``preds_per_t[i]`` = (uncond, safety, text) at
    timesteps_tensor[i], which the caller has already sorted descending (sld:1011)."""
    safety_momentum = None
    for i in range(len(preds_per_t)):
        model_pred_uncond, model_pred_safety_concept, model_pred_text = preds_per_t[i]
        noise_guidance = (model_pred_text - model_pred_uncond)
        if safety_momentum is None:
            safety_momentum = torch.zeros_like(noise_guidance)
        scale = torch.clamp(
            torch.abs((model_pred_text - model_pred_safety_concept)) * sld_guidance_scale, max=1.)
        safety_concept_scale = torch.where(
            (model_pred_text - model_pred_safety_concept) >= sld_threshold,
            torch.zeros_like(scale), scale)
        model_guidance_safety = torch.mul(
            (model_pred_safety_concept - model_pred_uncond), safety_concept_scale)
        model_guidance_safety = model_guidance_safety + sld_momentum_scale * safety_momentum
        safety_momentum = sld_mom_beta * safety_momentum + (1 - sld_mom_beta) * model_guidance_safety
        if step >= sld_warmup_steps:  # Warmup
            noise_guidance = noise_guidance - model_guidance_safety
        model_pred = model_pred_uncond + guidance_scale * noise_guidance
        model_target = model_pred_uncond + guidance_scale * (model_pred_safety_concept - model_pred_uncond)
    return F.mse_loss(model_pred.float(), model_target.float(), reduction="mean")


def ref_timesteps(g, timestep_range, timestep_count, num_train_timesteps=1000):
    # sld/concept_inversion.py:985-1011 with bsz = 1, drawing from g in the same order
    def unique_randint(n, low, high):
        if high - low < n:
            raise ValueError("Range size is less than the number of unique elements required.")
        return torch.randperm(high - low, generator=g)[:n] + low
    timesteps = torch.randint(timestep_range, num_train_timesteps, (1,), generator=g)
    timesteps_tensor = unique_randint(timestep_count, timesteps.item() - timestep_range, timesteps.item())
    timesteps_tensor, _ = torch.sort(timesteps_tensor, descending=True)
    return timesteps_tensor


# ------------------------------------------------------------------------------------------ helpers
def replay(k, seed, shape=SHAPE, requires_grad=False):
    """K timesteps of (ε_∅, ε_S, ε(c*)). ε(c*) − ε_S mixes O(1) gaps (some ≥ λ = 1), and tiny gaps
    (< 1/s_S) so that SLD's clamp is active and its threshold mask is exercised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        u = torch.randn(shape, generator=g)
        s = u + 0.3 * torch.randn(shape, generator=g)
        gap = 1.2 * torch.randn(shape, generator=g)
        tiny = torch.rand(shape, generator=g) < 0.25
        gap = torch.where(tiny, 1e-4 * torch.randn(shape, generator=g), gap)
        t = (s + gap).requires_grad_(requires_grad)
        out.append((u, s, t))
    return out


def impl_sld(preds, params, **kw):
    return INV.cce_sld_loss([p[0] for p in preds], [p[1] for p in preds], [p[2] for p in preds], params, **kw)


MAX = dict(guidance_scale=7.5, sld_warmup_steps=0, sld_guidance_scale=5000, sld_threshold=1.0,
           sld_momentum_scale=0.5, sld_mom_beta=0.7)
MEDIUM = dict(guidance_scale=7.5, sld_warmup_steps=10, sld_guidance_scale=1000, sld_threshold=0.01,
              sld_momentum_scale=0.3, sld_mom_beta=0.4)


# ---------------------------------------------------------------------------------------------- NP
@pytest.mark.parametrize("g", [7.5, 1.0, 3.0])
def test_np_loss_equals_reference(g):
    (u, s, t), = replay(1, 1, shape=(4, 4, 8, 8))
    ref = ref_np_loss(u, s, t, g)
    eps_unused = torch.randn(u.shape)
    got = INV.inversion_loss("np", eps_unused, t, s, g, eps_uncond=u)
    assert abs(got.item() - ref.item()) <= 1e-5 * max(1.0, ref.item())
    assert torch.equal(INV.cce_np_loss(u, s, t, g), got)


def test_np_gradient_only_through_learned_prediction():
    (u, s, t), = replay(1, 2, requires_grad=True)
    u.requires_grad_(True), s.requires_grad_(True)
    INV.cce_np_loss(u, s, t, 7.5).backward()
    t2 = t.detach().clone().requires_grad_(True)
    ref_np_loss(u.detach(), s.detach(), t2, 7.5).backward()
    assert torch.allclose(t.grad, t2.grad, atol=1e-6)
    assert u.grad is None                            # target carries no gradient (and needs none)
    # NP's target is the safety text's CFG prediction, not the noise: the loss ignores ε
    eps = torch.randn(SHAPE)
    assert not torch.isclose(INV.inversion_loss("np", eps, t, s, 7.5, eps_uncond=u),
                             F.mse_loss(INV.guided_eps(t, s, 7.5), eps))
    assert torch.equal(INV.inversion_loss("np", eps, t, s, 7.5, eps_uncond=u),
                       INV.inversion_loss("np", torch.randn(SHAPE), t, s, 7.5, eps_uncond=u))


def test_np_target_formula():
    (u, s, _), = replay(1, 3)
    assert torch.allclose(INV.cce_np_target(u, s, 7.5), u + 7.5 * (s - u))


# --------------------------------------------------------------------------------------------- SLD
@pytest.mark.parametrize("cfg,step", [(MAX, 0), (MAX, 5), (MEDIUM, 3), (MEDIUM, 12)])
@pytest.mark.parametrize("k", [1, 13, 35])
def test_sld_loss_equals_reference(cfg, step, k):
    preds = replay(k, 100 + k)
    ref = ref_sld_loss(preds, step, **cfg)
    got = impl_sld(preds, INV.CCESLDSettings(**cfg), train_step=step)
    assert abs(got.item() - ref.item()) <= 1e-5 * max(1.0, ref.item()), (got.item(), ref.item())
    via_api = INV.inversion_loss("sld", None, [p[2] for p in preds], [p[1] for p in preds],
                                 cfg["guidance_scale"], eps_uncond=[p[0] for p in preds],
                                 sld=INV.CCESLDSettings(**cfg), train_step=step)
    assert abs(via_api.item() - ref.item()) <= 1e-5 * max(1.0, ref.item())


def test_sld_gradient_matches_reference_including_momentum_path():
    preds = replay(13, 7, requires_grad=True)
    impl_sld(preds, INV.CCESLDSettings(**MAX)).backward()
    preds2 = [(u, s, t.detach().clone().requires_grad_(True)) for u, s, t in preds]
    ref_sld_loss(preds2, 0, **MAX).backward()
    for (_, _, t), (_, _, t2) in zip(preds, preds2):
        assert torch.allclose(t.grad, t2.grad, atol=1e-6, rtol=1e-5)
    # earlier timesteps reach the loss only through the momentum, via the clamp region of β
    assert preds[0][2].grad.abs().sum() > 0


def test_sld_sorts_by_timestep_when_given():
    preds = replay(13, 11)
    g = torch.Generator().manual_seed(3)
    ts = INV.cce_sld_timesteps(g, 50, 13)                   # descending
    perm = torch.randperm(13, generator=g)
    shuffled = [preds[i] for i in perm]
    ref = ref_sld_loss(preds, 0, **MAX)                      # CCE: sorted order
    got = impl_sld(shuffled, INV.CCESLDSettings(**MAX), timesteps=ts[perm])
    assert abs(got.item() - ref.item()) <= 1e-5 * max(1.0, ref.item())


def test_sld_momentum_order_matters():
    """Same last timestep, earlier ones permuted: a different loss (the momentum is an ordered EMA)."""
    preds = replay(13, 12)
    params = INV.CCESLDSettings(**MAX)
    base = impl_sld(preds, params)
    swapped = preds[:-1][::-1] + preds[-1:]
    assert not math.isclose(impl_sld(swapped, params).item(), base.item(), rel_tol=1e-4)
    # ... and unsorted input with its timesteps is put back into CCE's descending order
    ts = torch.arange(13, 0, -1)
    assert math.isclose(impl_sld(swapped, params, timesteps=torch.cat([ts[:-1].flip(0), ts[-1:]])).item(),
                        base.item(), rel_tol=1e-6)


def test_sld_without_momentum_only_last_timestep_counts():
    preds = replay(8, 13)
    other = replay(8, 14)[:-1] + preds[-1:]
    p0 = INV.CCESLDSettings(**{**MAX, "sld_momentum_scale": 0.0})
    assert math.isclose(impl_sld(preds, p0).item(), impl_sld(other, p0).item(), rel_tol=1e-7)
    p1 = INV.CCESLDSettings(**MAX)
    assert not math.isclose(impl_sld(preds, p1).item(), impl_sld(other, p1).item(), rel_tol=1e-4)


def test_sld_warmup_gives_no_safety_term():
    preds = replay(13, 15)
    params = INV.CCESLDSettings(**MEDIUM)                        # warm-up 10 (training steps, sld:1088)
    u, s, t = preds[-1]
    plain = F.mse_loss(u + 7.5 * (t - u), u + 7.5 * (s - u))  # no γ at all
    assert math.isclose(impl_sld(preds, params, train_step=9).item(), plain.item(), rel_tol=1e-6)
    assert math.isclose(impl_sld(replay(12, 16) + preds[-1:], params, train_step=9).item(), plain.item(),
                        rel_tol=1e-6)
    assert not math.isclose(impl_sld(preds, params, train_step=10).item(), plain.item(), rel_tol=1e-4)


def test_sld_threshold_and_first_step():
    """K = 1: v = 0, so γ = β(ε_S − ε_∅) with β = 0 where ε(c*) − ε_S ≥ λ, else min(|·|·s_S, 1)."""
    (u, s, t), = replay(1, 17)
    d = t - s
    beta = torch.where(d >= 1.0, torch.zeros_like(d), torch.clamp(d.abs() * 5000, max=1.0))
    pred = u + 7.5 * ((t - u) - beta * (s - u))
    want = F.mse_loss(pred, u + 7.5 * (s - u))
    assert math.isclose(impl_sld([(u, s, t)], INV.CCESLDSettings()).item(), want.item(), rel_tol=1e-6)
    assert (d >= 1.0).any() and (d.abs() < 1 / 5000).any()   # both regimes exercised


def test_sld_no_state_between_samples():
    preds = replay(13, 18)
    params = INV.CCESLDSettings()
    a = impl_sld(preds, params).item()
    impl_sld(replay(13, 19), params)
    assert impl_sld(preds, params).item() == a


# ---------------------------------------------------------------------------------- sampling, misc
@pytest.mark.parametrize("rng,count", [(90, 35), (50, 13)])
def test_sld_timesteps_match_reference_draw(rng, count):
    for seed in range(20):
        ref = ref_timesteps(torch.Generator().manual_seed(seed), rng, count)
        got = INV.cce_sld_timesteps(torch.Generator().manual_seed(seed), rng, count)
        assert torch.equal(got, ref)
        assert len(set(got.tolist())) == count and bool((got[:-1] > got[1:]).all())
        assert got.min() >= 0 and got.max() <= 999 and got.max() - got.min() < rng
    with pytest.raises(ValueError):
        INV.cce_sld_timesteps(torch.Generator(), 10, 13)


def test_kdiffusion_noising_is_ddpm_noising():
    """x = x0 + σε with σ = √((1−ᾱ)/ᾱ) is CCE's x_t = √ᾱ x0 + √(1−ᾱ) ε divided by √ᾱ; an ε-model behind
    the k-diffusion wrapper (c_in = 1/√(σ²+1), D = x − σ·ε_θ(c_in·x)) gives back ε_θ(x_t)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2   # SD1 scaled_linear
    ac = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - ac) / ac).sqrt()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    w = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps_model = lambda xt: torch.tanh(xt * w)                                    # noqa: E731
    for t in (0, 17, 500, 999):
        xt = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
        x = x0 + sigmas[t] * eps
        assert torch.allclose(x * ac[t].sqrt(), xt)
        c_in = 1 / (sigmas[t] ** 2 + 1).sqrt()
        den = x - sigmas[t] * eps_model(c_in * x)
        assert torch.allclose((x - den) / sigmas[t], eps_model(xt))


def test_sld_sample_shares_one_noise():
    sig = torch.linspace(0.03, 14.6, 1000)
    lat = torch.randn(3, 4, 8, 8)
    x, sigma, eps, idx, ts = INV.cce_sld_sample(lat, sig, torch.Generator().manual_seed(1), 50, 13)
    assert x.shape == (13, 4, 8, 8) and torch.equal(sigma, sig[ts])
    assert torch.allclose(x, lat[idx:idx + 1] + sigma.view(-1, 1, 1, 1) * eps)


def test_old_objectives_unchanged_and_defaults():
    (u, s, t), = replay(1, 20)
    eps = torch.randn(SHAPE)
    assert torch.allclose(INV.inversion_loss("ldm", eps, t), F.mse_loss(t, eps))
    for obj in ("np", "sld"):
        with pytest.raises(ValueError):
            INV.inversion_loss(obj, eps, t, s, 7.5)
    assert INV.OBJECTIVES == ("ldm", "np", "sld")
    d = INV.DEFAULTS
    assert d["np"]["guidance_scale"] == 7.5 and d["np"]["adam_weight_decay"] == 1e-2
    assert (d["sld"]["sld_guidance_scale"], d["sld"]["sld_threshold"], d["sld"]["sld_momentum_scale"],
            d["sld"]["sld_mom_beta"], d["sld"]["sld_warmup_steps"]) == (5000, 1.0, 0.5, 0.7, 0)
    assert d["sld"]["max_train_steps"] == 1000 and d["np"]["max_train_steps"] == 5000
    assert len(INV.CCE_OBJECT_TEMPLATES) == 27 and len(INV.CCE_STYLE_TEMPLATES) == 19
    assert INV.CCE_STYLE_TEMPLATES[0] == "a painting in the style of {}"
    assert all("{}" in x for v in INV.CCE_TEMPLATES.values() for x in v)
