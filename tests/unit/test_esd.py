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
