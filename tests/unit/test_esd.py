"""ESD math on a tiny torch module (no ComfyUI): parameter selection, target, sampling, training.

The end-to-end check trains ESD-x-strict with the shared loop on a tiny cross-attention
denoiser whose concept tokens live in a different subspace of the context than the unrelated
prompt's: the concept's prediction must approach the ESD target and, because only to_k/to_v
train and their gradients are outer products with the concept's tokens, the unrelated prompt's
prediction must not move at all.
"""
import logging
import math

import pytest
import torch
from torch import nn

from safegen_core import esd as ESD
from safegen_core.training import TrainConfig, train

CTX = 8


class Attn(nn.Module):
    def __init__(self, dim, ctx):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, h, ctx):
        q, k, v = self.to_q(h), self.to_k(ctx), self.to_v(ctx)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
        return self.to_out(a @ v)


class TinyDenoiser(nn.Module):
    """ε(x, σ, ctx) with UNet-like names: conv_in, time_embed, attn1 (self), attn2 (cross), norm, conv_out."""

    def __init__(self, ch=4, dim=16, ctx=CTX):
        super().__init__()
        self.conv_in = nn.Conv2d(ch, dim, 1)
        self.time_embed = nn.Sequential(nn.Linear(1, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn1 = Attn(dim, dim)
        self.attn2 = Attn(dim, ctx)
        self.conv_out = nn.Conv2d(dim, ch, 1)

    def forward(self, x, sigma, ctx):
        c_in = (1.0 / torch.sqrt(1.0 + sigma ** 2)).view(-1, 1, 1, 1)
        h = self.conv_in(x * c_in) + self.time_embed(sigma.log().view(-1, 1))[:, :, None, None]
        b, d, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)
        t = t + self.attn1(self.norm(t), self.norm(t))
        t = t + self.attn2(self.norm(t), ctx)
        return self.conv_out(t.transpose(1, 2).reshape(b, d, hh, ww))


def functional_eps(net, deltas):
    base = {n: p.detach() for n, p in net.named_parameters()}

    def eps_fn(x, sigma, cond, erased):
        c, _ = cond
        params = {n: (base[n] + deltas[n]) if (erased and n in deltas) else base[n] for n in base}
        return torch.func.functional_call(net, params, (x, sigma, c))
    return eps_fn


def test_select_parameters_per_variant():
    net = TinyDenoiser()
    x = ESD.select_parameters(net, "x")
    assert x == ["attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight",
                 "attn2.to_out.0.bias"]
    assert ESD.select_parameters(net, "esd-x-strict") == ["attn2.to_k.weight", "attn2.to_v.weight"]
    u = ESD.select_parameters(net, "u")
    assert not [n for n in u if "attn2" in n]
    assert "norm.weight" not in u and "conv_in.weight" in u and "time_embed.0.weight" in u
    assert "attn1.to_q.weight" in u and "conv_out.bias" in u
    assert set(x) | set(u) == {n for n, _ in net.named_parameters()} - {"norm.weight", "norm.bias"}


def test_bad_variant_and_empty_selection_are_named():
    with pytest.raises(ValueError, match="'bogus'"):
        ESD.check_variant("bogus")
    with pytest.raises(ValueError, match="'x'.*selects no parameters"):
        ESD.select_parameters(nn.Sequential(nn.Linear(2, 2)), "x")


def test_target_formula():
    e0, ec = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert torch.allclose(ESD.esd_target(e0, ec, 1.0), torch.tensor([-1.0, 3.0]))
    assert torch.equal(ESD.esd_target(e0, ec, 0.0), e0)
    # the newer esd_sd.py form e_c − η'(e_c − e_0) with η' = η + 1 is the same target
    assert torch.allclose(ec - 3.0 * (ec - e0), ESD.esd_target(e0, ec, 2.0))


def test_schedule_and_guided_euler_sampling():
    train_sigmas = torch.linspace(0.03, 14.6, 1000)
    s = ESD.ddim_sigmas(train_sigmas, 5)
    assert s.shape == (5,) and s[0] == train_sigmas[-1] and s[-1] == train_sigmas[0]
    assert bool((s[1:] < s[:-1]).all())

    def const_eps(x, sigma, cond, erased):
        c, _ = cond
        return c[:, 0, 0].view(-1, 1, 1, 1).expand_as(x).clone()   # ε̂ = the cond's first value

    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    null, concept = (torch.zeros(1, 3, CTX), None), (torch.ones(1, 3, CTX), None)
    for k in range(5):
        x = ESD.sample_until(const_eps, noise, s, k, concept, null, 3.0, True)
        # guided ε̂ = 0 + 3·(1 − 0) = 3 every step: x_k = x_T + (σ_k − σ_0)·3
        assert torch.allclose(x, ESD.start_noise(noise, s[0]) + (s[k] - s[0]) * 3.0, atol=1e-5)


def test_cat_conds_repeats_to_common_length_and_expands():
    a, b = torch.randn(1, 77, 4), torch.randn(2, 154, 4)
    c, p = ESD.cat_conds([(a, None), (b, None)], [3, 2])
    assert c.shape == (5, 154, 4) and p is None
    assert torch.equal(c[0, 77:], a[0]) and torch.equal(c[3:], b)
    c, p = ESD.cat_conds([(a, torch.ones(1, 2)), (a, torch.zeros(1, 2))], [2, 1])
    assert p.shape == (3, 2) and p[:2].eq(1).all() and p[2].eq(0).all()


def test_replacement_and_patch_agree_bitwise():
    g = torch.Generator().manual_seed(0)
    base32 = {"w": torch.randn(64, 64, generator=g)}
    d = {"w": 1e-3 * torch.randn(64, 64, generator=g)}
    t, p = ESD.replacement_and_patch(base32, d)
    assert t["w"].dtype == torch.float32 and torch.equal(base32["w"] + 1.0 * p["w"], t["w"])
    base16 = {"w": base32["w"].half()}
    t, p = ESD.replacement_and_patch(base16, d)
    assert t["w"].dtype == torch.float16
    assert torch.equal((base16["w"].float() + p["w"]).half(), t["w"])
    with pytest.raises(FloatingPointError, match="w"):
        ESD.replacement_and_patch(base32, {"w": torch.full((64, 64), float("nan"))})


@pytest.fixture
def one_thread():
    """Tiny ops are dominated by thread hand-off on a busy 2-core machine: run them on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_esd_training_reaches_target_and_leaves_other_subspace_alone(one_thread, record_property):
    torch.manual_seed(0)
    net = TinyDenoiser()
    g = torch.Generator().manual_seed(1)
    concept = torch.zeros(1, 3, CTX)
    concept[..., :4] = torch.randn(1, 3, 4, generator=g) * 2
    null, other = torch.zeros(1, 3, CTX), torch.zeros(1, 3, CTX)
    null[..., 4:] = torch.randn(1, 3, 4, generator=g)
    other[..., 4:] = torch.randn(1, 3, 4, generator=g) * 2
    keys = ESD.select_parameters(net, "x-strict")
    deltas = {k: torch.zeros_like(dict(net.named_parameters())[k]) for k in keys}
    eps = functional_eps(net, deltas)
    sigmas = ESD.ddim_sigmas(torch.linspace(0.03, 14.6, 1000), 6)
    c, n, o = (concept, None), (null, None), (other, None)
    points = ESD.eval_points(eps, c, n, sigmas, [1, 4, 4, 4], 12, seed=5)
    err_before = ESD.target_error(eps, points, c, n, 1.0, erased=True)
    loss_fn = ESD.make_esd_loss_fn(eps, c, n, sigmas, [1, 4, 4, 4], eta=1.0, start_guidance=3.0)
    res = train(deltas, loss_fn, TrainConfig(steps=80, lr=3e-2, seed=0, optimizer="adam"))
    err_after = ESD.target_error(eps, points, c, n, 1.0, erased=True)
    first, last = sum(res.losses[:10]) / 10, sum(res.losses[-10:]) / 10
    nums = dict(loss_first10=first, loss_last10=last, target_err_before=err_before,
                target_err_after=err_after,
                concept_rel_change=ESD.relative_change(eps, points, c),
                unrelated_rel_change=ESD.relative_change(eps, points, o))
    for k, v in nums.items():
        record_property(k, v)
    logging.getLogger(__name__).warning("tiny ESD: %s", {k: f"{v:.4g}" for k, v in nums.items()})
    assert last < 0.5 * first, nums
    assert err_after < 0.3 * err_before, nums
    assert nums["concept_rel_change"] > 0.05, nums
    assert nums["unrelated_rel_change"] < 1e-6, nums   # gradients never touch the unrelated subspace


# ------------------------------------------------------------------------------ references
# Independent transcriptions of rohitgandikota/erasing (reference lines: docs/esd.md):
# CompVis train-scripts/train-esd.py @ b8aeab6, ldm/models/diffusion/ddim.py @ b8aeab6, esd_sd.py @ ce8d4d9.

def sd_alphas_cumprod():
    """SD-1.x scaled_linear schedule (beta 0.00085..0.012, 1000 steps), float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def sigmas_of(acp):
    return ((1 - acp) / acp).sqrt()


def vp_eps(z, t, c, erased):
    """A toy ε model in ldm/diffusers (variance-preserving) terms: depends on latent, step and cond."""
    tt = torch.as_tensor(t, dtype=z.dtype).view(-1, 1, 1, 1)
    cm = c[:, :, :4].mean((1, 2)).view(-1, 1, 1, 1).to(z.dtype)
    return 0.5 * torch.tanh(z) * (1 + cm) + 0.3 * cm * torch.cos(tt / 150.0) + (0.2 * z if erased else 0.0)


def kd_eps_fn(train_sigmas):
    """The same model behind our eps_fn(x, σ, cond, erased) interface: z = x/√(1+σ²), t = the σ's step."""
    logs = train_sigmas.double().log()

    def eps_fn(x, sigma, cond, erased):
        s = sigma.double()
        t = (s.log()[:, None] - logs[None]).abs().argmin(1)
        assert torch.allclose(train_sigmas.double()[t], s, rtol=1e-6), "σ off the training grid"
        z = x.double() / (1 + s ** 2).sqrt().view(-1, 1, 1, 1)
        return vp_eps(z, t, cond[0].double(), erased).to(x.dtype)
    return eps_fn


def test_reference_defaults():
    e, o = ESD.REFERENCE_DEFAULTS["erased"], ESD.REFERENCE_DEFAULTS["original"]
    assert (e["steps"], e["lr"], e["eta"], e["start_guidance"], e["sampling_steps"]) == (1000, 1e-5, 1.0, 3.0, 50)
    assert (o["steps"], o["lr"], o["eta"], o["start_guidance"], o["sampling_steps"]) == (200, 5e-5, 1.0, 3.0, 50)
    assert e["xt_model"] == "erased" and o["xt_model"] == "original"
    assert "b8aeab6" in e["source"] and "ce8d4d9" in o["source"]


@pytest.mark.parametrize("n", [50, 30, 7, 1])
def test_compvis_timestep_draw_matches_reference_arithmetic(n):
    shape = (1, 4, 2, 2)
    for seed in range(200):
        k, t, noise = ESD.draw_reference_point(torch.Generator().manual_seed(seed), n, shape, "erased")
        g = torch.Generator().manual_seed(seed)
        ddim_steps = n
        t_enc = torch.randint(ddim_steps, (1,), generator=g)                       # L226
        og_num = round((int(t_enc) / ddim_steps) * 1000)                           # L228
        og_num_lim = round((int(t_enc + 1) / ddim_steps) * 1000)                   # L229
        t_enc_ddpm = torch.randint(og_num, og_num_lim, (1,), generator=g)          # L231
        start_code = torch.randn(shape, generator=g)                               # L233
        assert (k, t) == (int(t_enc), int(t_enc_ddpm)) and torch.equal(noise, start_code)
    bins = [(round(k / n * 1000), round((k + 1) / n * 1000)) for k in range(n)]
    assert bins[0][0] == 0 and bins[-1][1] == 1000
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bins, bins[1:] + [(1000, 1001)]))
    if n == 50:
        ts = {ESD.compvis_timestep(k, 50, torch.Generator().manual_seed(s)) for s in range(40) for k in (0, 49)}
        assert ts <= set(range(0, 20)) | set(range(980, 1000)) and len(ts) > 30


def ldm_till_t(n, till_T):
    """ldm ddim.py: make_ddim_timesteps(uniform) + make_ddim_sampling_parameters + ddim_sampling with
    t_start=-1: (steps visited, alphas_cumprod index after the last step)."""
    c = 1000 // n
    ddim_timesteps = [t + 1 for t in range(0, 1000, c)]
    alphas_prev = [0] + ddim_timesteps[:-1]            # alphacums indices
    timesteps = ddim_timesteps[:-1]                    # timesteps[:t_start], t_start = -1
    total_steps = len(timesteps)
    till = till_T if till_T is not None else 0
    visited, last = [], None
    for i, step in enumerate(reversed(timesteps)):
        index = total_steps - i - 1
        assert ddim_timesteps[index] == step
        visited.append(step)
        last = alphas_prev[index]
        if index + 1 == till:
            break
    return visited, last


@pytest.mark.parametrize("n", [50, 30, 7])
def test_compvis_chain_and_steps_match_ldm_sampler(n):
    chain = ESD.compvis_chain(n)
    if n == 50:
        assert ESD.ldm_ddim_timesteps(50) == list(range(1, 1000, 20)) and chain[:2] == [961, 941] and chain[-1] == 0
    for k in range(n):
        visited, last = ldm_till_t(n, k)
        s = ESD.compvis_steps_run(k, n)
        assert chain[:s] == visited and chain[s] == last, (k, s)
    assert ESD.compvis_steps_run(0, 50) == ESD.compvis_steps_run(1, 50) == 49 and ESD.compvis_steps_run(49, 50) == 1


def test_erased_reference_loss_matches_ldm_transcription():
    """The whole CompVis step (DDIM of the erased model in VP space, jittered t, frozen targets on
    the same latent z) against our σ-space loss for the same generator."""
    acp = sd_alphas_cumprod()
    sig = sigmas_of(acp)
    eps_fn = kd_eps_fn(sig.float())
    g = torch.Generator().manual_seed(3)
    concept = (torch.randn(1, 3, CTX, generator=g), None)
    null = (torch.zeros(1, 3, CTX), None)
    n, shape, eta, sg = 10, (1, 4, 3, 3), 1.0, 3.0
    loss_fn = ESD.make_esd_loss_fn(eps_fn, concept, null, torch.zeros(n), shape, eta=eta, start_guidance=sg,
                                   xt_sampler="erased", train_sigmas=sig.float())
    seen_k = set()
    for seed in range(12):
        ours = float(loss_fn(0, torch.Generator().manual_seed(seed)))
        g = torch.Generator().manual_seed(seed)
        t_enc = int(torch.randint(n, (1,), generator=g))
        t_ddpm = int(torch.randint(round(t_enc / n * 1000), round((t_enc + 1) / n * 1000), (1,), generator=g))
        z = torch.randn(shape, generator=g).double()
        c_ddim = 1000 // n
        grid = [t + 1 for t in range(0, 1000, c_ddim)]
        timesteps = grid[:-1]
        for i, step in enumerate(reversed(timesteps)):                  # ddim_sampling, t_start = -1
            index = len(timesteps) - i - 1
            a_t, a_prev = acp[grid[index]], (acp[grid[index - 1]] if index > 0 else acp[0])
            e_u = vp_eps(z, [step], null[0].double(), True)
            e_c = vp_eps(z, [step], concept[0].double(), True)
            e_t = e_u + sg * (e_c - e_u)
            pred_x0 = (z - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
            z = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t
            if index + 1 == t_enc:
                break
        e_0 = vp_eps(z, [t_ddpm], null[0].double(), False)
        e_p = vp_eps(z, [t_ddpm], concept[0].double(), False)
        e_n = vp_eps(z, [t_ddpm], concept[0].double(), True)
        ref = float(torch.nn.functional.mse_loss(e_n, e_0 - eta * (e_p - e_0)))
        assert loss_fn.last_point["k"] == t_enc and loss_fn.last_point["t"] == t_ddpm
        assert math.isclose(ours, ref, rel_tol=1e-4), (seed, ours, ref)
        seen_k.add(t_enc)
    assert len(seen_k) >= 5


def test_pndm_schedule_and_plms_sampler_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                                  steps_offset=1)   # CompVis/stable-diffusion-v1-4 scheduler_config.json
    sch.set_timesteps(50)
    assert ESD.pndm_timesteps(50) == sch.timesteps.tolist()
    assert ESD.pndm_timesteps(50)[:4] == [981, 961, 961, 941] and len(ESD.pndm_timesteps(50)) == 51
    acp = sch.alphas_cumprod.double()
    sig = sigmas_of(acp)
    eps_fn = kd_eps_fn(sig.float())
    g = torch.Generator().manual_seed(0)
    concept, null = (torch.randn(1, 3, CTX, generator=g), None), (torch.zeros(1, 3, CTX), None)
    noise = torch.randn(1, 4, 3, 3, generator=g)
    n, sg = 8, 3.0
    for k in range(n):
        sch.set_timesteps(n)
        ts = sch.timesteps.tolist()
        lat = noise.double() * sch.init_noise_sigma
        for t in ts[0:k]:                                         # sd_utils.py L209-244
            e_u = vp_eps(lat, [t], null[0].double(), False)
            e_c = vp_eps(lat, [t], concept[0].double(), False)
            lat = sch.step(e_u + sg * (e_c - e_u), t, lat, return_dict=False)[0]
        x = ESD.sample_plms_until(eps_fn, noise, sig.float(), n, k, concept, null, sg, False)
        t_k = ESD.pndm_timesteps(n)[k]
        assert t_k == ts[k]
        assert torch.allclose(x.double() / (1 + sig[t_k] ** 2).sqrt(), lat, rtol=1e-4, atol=1e-5), k


def test_original_reference_loss_uses_frozen_plms_sample_at_its_timestep():
    acp = sd_alphas_cumprod()
    sig = sigmas_of(acp).float()
    calls = []
    base = kd_eps_fn(sig)

    def eps_fn(x, sigma, cond, erased):
        calls.append((float(sigma[0]), erased))
        return base(x, sigma, cond, erased)

    concept, null = (torch.ones(1, 3, CTX), None), (torch.zeros(1, 3, CTX), None)
    loss_fn = ESD.make_esd_loss_fn(eps_fn, concept, null, torch.zeros(6), (1, 4, 2, 2), xt_sampler="original",
                                   train_sigmas=sig)
    for seed in range(6):
        calls.clear()
        loss_fn(0, torch.Generator().manual_seed(seed))
        p = loss_fn.last_point
        g = torch.Generator().manual_seed(seed)
        k = int(torch.randint(0, 6, (1,), generator=g))
        assert p["k"] == k and p["t"] == ESD.pndm_timesteps(6)[k] and p["sigma"] == p["sigma_x"]
        sampling = calls[:k]
        assert [e for _, e in sampling] == [False] * k                # frozen base samples
        assert [s for s, _ in calls[k:]] == [p["sigma"]] * 2 and [e for _, e in calls[k:]] == [False, True]


class LdmAttn(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(d, d), nn.Dropout(0.0))


class LdmBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.attn1, self.attn2 = LdmAttn(d), LdmAttn(d)
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(d, 2 * d)), nn.Dropout(0.0), nn.Linear(2 * d, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)


class LdmST(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm = nn.GroupNorm(2, d)
        self.proj_in = nn.Conv2d(d, d, 1)
        self.transformer_blocks = nn.ModuleList([LdmBlock(d)])
        self.proj_out = nn.Conv2d(d, d, 1)


class LdmRes(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(2, d), nn.SiLU(), nn.Conv2d(d, d, 3))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(16, d))
        self.out_layers = nn.Sequential(nn.GroupNorm(2, d), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(d, d, 3))


class LdmUNet(nn.Module):
    """ComfyUI's (= CompVis ldm's) UNet naming on a few blocks."""

    def __init__(self, d=8):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(d, 16), nn.SiLU(), nn.Linear(16, 16))
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, d, 3)), nn.Sequential(LdmRes(d), LdmST(d))])
        self.middle_block = nn.Sequential(LdmRes(d), LdmST(d))
        self.output_blocks = nn.ModuleList([nn.Sequential(LdmRes(d), LdmST(d)) for _ in range(9)])
        self.out = nn.Sequential(nn.GroupNorm(2, d), nn.SiLU(), nn.Conv2d(d, 4, 3))


def test_parameter_selection_per_reference_on_ldm_names():
    net = LdmUNet()
    names = [n for n, _ in net.named_parameters()]
    # CompVis noxattn / xattn: train-esd.py L167-168, L179-180 over named_parameters()
    u_e = ESD.select_parameters(net, "u", reference="erased")
    assert u_e == [n for n in names if not (n.startswith("out.") or "attn2" in n or "time_embed" in n)]
    for n in ("input_blocks.1.0.in_layers.0.weight", "input_blocks.1.1.norm.bias",
              "middle_block.1.transformer_blocks.0.norm2.weight", "output_blocks.8.0.out_layers.0.weight",
              "input_blocks.0.0.weight", "input_blocks.1.0.emb_layers.1.weight",
              "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"):
        assert n in u_e, n
    for n in ("out.0.weight", "out.2.weight", "out.2.bias", "time_embed.0.weight", "time_embed.2.bias",
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"):
        assert n not in u_e, n
    x_e = ESD.select_parameters(net, "x", reference="erased")
    assert x_e == [n for n in names if "attn2" in n] and len(x_e) == 11 * 5
    # esd_sd.py esd-u / esd-x: Linear/Conv2d modules by module name (L28-37)
    u_o = ESD.select_parameters(net, "u", reference="original")
    mods = dict(net.named_modules())
    expect = [n for n in names if isinstance(mods[n.rsplit(".", 1)[0]], (nn.Linear, nn.Conv2d))
              and "attn2" not in n.rsplit(".", 1)[0]]
    assert u_o == expect and ESD.select_parameters(net, "u") == u_o
    assert {"time_embed.0.weight", "time_embed.2.bias", "out.2.weight", "input_blocks.0.0.weight"} <= set(u_o)
    assert not [n for n in u_o if "norm" in n or n.startswith("out.0") or "in_layers.0" in n
                or "out_layers.0" in n]
    assert ESD.select_parameters(net, "x", reference="original") == x_e
    strict = [f"{p}.transformer_blocks.0.attn2.{w}.weight" for p in
              ["input_blocks.1.1", "middle_block.1"] + [f"output_blocks.{i}.1" for i in range(9)] for w in ("to_k", "to_v")]
    for ref in ("erased", "original", None):
        assert ESD.select_parameters(net, "x-strict", reference=ref) == strict
    # the references differ exactly by: norms, out.*, time_embed.*
    diff = set(u_e) ^ set(u_o)
    assert diff and all("norm" in n or n.startswith(("out.", "time_embed.")) or "_layers.0." in n for n in diff)
    with pytest.raises(ValueError, match="bogus"):
        ESD.select_parameters(net, "u", reference="bogus")


def test_compvis_train_methods_transcribed():
    assert ESD.compvis_selects("output_blocks.6.1.transformer_blocks.0.attn2.to_k.weight", "xlayer")
    assert not ESD.compvis_selects("output_blocks.7.1.transformer_blocks.0.attn2.to_k.weight", "xlayer")
    assert ESD.compvis_selects("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "selflayer")
    assert ESD.compvis_selects("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "notime")
    assert not ESD.compvis_selects("time_embed.0.weight", "notime") and ESD.compvis_selects("out.0.weight", "full")
    assert not ESD.compvis_selects("input_blocks.1.1.norm.weight", "esd-u")


def test_concept_difference_flags_an_ignored_concept():
    sig = sigmas_of(sd_alphas_cumprod()).float()
    sigmas = ESD.ddim_sigmas(sig, 10)
    concept, null = (torch.randn(1, 3, CTX, generator=torch.Generator().manual_seed(1)), None), (torch.zeros(1, 3, CTX), None)

    def blind(x, sigma, cond, erased):        # ignores the condition: ε(c) = ε(∅)
        return torch.tanh(x) / (1 + sigma.view(-1, 1, 1, 1))

    v0 = ESD.concept_difference(blind, concept, null, sigmas, (1, 4, 4, 4), n_points=4, seed=0)
    assert v0 == 0.0 and ESD.nothing_to_erase(v0)
    torch.manual_seed(0)
    net = TinyDenoiser()
    eps = functional_eps(net, {})
    v1 = ESD.concept_difference(eps, concept, null, sigmas, (1, 4, 4, 4), n_points=4, seed=0)
    assert v1 > 10 * ESD.NOTHING_TO_ERASE_TOL and not ESD.nothing_to_erase(v1), v1
    assert v1 == ESD.concept_difference(eps, concept, null, sigmas, (1, 4, 4, 4), n_points=4, seed=0)
    v2 = ESD.concept_difference(kd_eps_fn(sig), concept, null, sigmas, (1, 4, 4, 4))
    assert not ESD.nothing_to_erase(v2)
    assert ESD.nothing_to_erase(float("nan")) and ESD.nothing_to_erase(5e-4) and not ESD.nothing_to_erase(2e-3)


def test_loss_rose_on_rising_falling_and_noisy_flat_runs():
    def chi2(seed, n, df):                 # MSE-like losses, mean 1, right-skewed
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(n, df, generator=g) ** 2).mean(1).tolist()

    n = 200
    rising = [(1 + 4 * i / n) * v for i, v in enumerate(chi2(0, n, 4))]      # ×5 ramp
    msg = ESD.loss_rose(rising)
    assert isinstance(msg, str) and "rose" in msg
    diverging = [v * math.exp(i / 40) for i, v in enumerate(chi2(1, n, 1))]  # lr too high
    assert ESD.loss_rose(diverging)
    assert ESD.loss_rose([1.0 + 0.1 * i for i in range(40)])                 # clean ramp
    for s in range(20):
        assert ESD.loss_rose([(5 - 4 * i / n) * v for i, v in enumerate(chi2(10 + s, n, 1))]) is False
    flat = [s for s in range(200) for df in (1, 4) if ESD.loss_rose(chi2(1000 + s, n, df))]
    assert len(flat) <= 4, flat                                               # ≈0.7 % expected; measured 3
    assert ESD.loss_rose([1.0, 2.0, 3.0]) is False                            # too short to judge
    assert ESD.loss_rose([1.0] * 30 + [float("nan")])
