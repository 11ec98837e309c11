"""ESD — Erasing Concepts from Diffusion Models (Gandikota et al. 2023), comfy-free.

Objective (rohitgandikota/erasing, ``train-scripts/train-esd.py`` and ``esd_sd.py``): fine-tune a
subset θ of the UNet so that its conditional prediction for the concept c is the *negatively
guided* prediction of the frozen original θ0::

    ε*(x_t, t) = ε_θ0(x_t, ∅, t) − η · (ε_θ0(x_t, c, t) − ε_θ0(x_t, ∅, t))
    L          = ‖ε_θ(x_t, c, t) − ε*(x_t, t)‖²        (mean squared error)

x_t is not a noised data sample: it is obtained by *partially sampling* — start from pure noise,
run k of N deterministic DDIM steps with classifier-free guidance (scale ``start_guidance``,
reference 3) conditioned on c — and the loss is evaluated at the k-th timestep of that schedule,
k uniform in [0, N). The original CompVis script samples with the model being trained (the
default here, ``xt_sampler="erased"``); the newer diffusers script samples with the frozen base
(``"original"``).

Parameter selection per variant (the reference picks the parameters of ``Linear``/``Conv2d``
modules by module name; norms are never trained):

* ``x``        — ESD-x: cross-attention modules (``attn2``: to_q, to_k, to_v, to_out).
* ``u``        — ESD-u: every Linear/Conv2d module that is *not* cross-attention.
* ``x-strict`` — ESD-x-strict: ``attn2.to_k`` and ``attn2.to_v`` only.

η convention: the formula above is the paper's (CompVis script, η default 1). The newer
``esd_sd.py`` writes the target as ε_θ0(c) − η'(ε_θ0(c) − ε_θ0(∅)), i.e. η' = η + 1 (its default
η' = 2 is η = 1 here).

Everything works in k-diffusion terms (x = x0 + σ·ε, the convention of ComfyUI's samplers):
DDIM with η_DDIM = 0 is exactly an Euler step of the probability-flow ODE in σ,
x ← x + (σ_next − σ)·ε̂. The model is reached through a callable
``eps_fn(x, sigma, cond, erased) -> ε`` where ``erased`` selects the weights being trained
(True) or the frozen originals (False), so this module needs no ComfyUI import and the same
code is unit-tested on a tiny torch module.

A *condition* (``Cond``) is a tuple ``(cross_attn [B|1, L, D], pooled [B|1, P] or None)``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

VARIANTS = ("x", "u", "x-strict")
XT_SAMPLERS = ("erased", "original")
TRAINABLE_TYPES = (torch.nn.Linear, torch.nn.Conv2d)

Cond = tuple  # (cross_attn tensor, pooled tensor or None)
EpsFn = Callable[[torch.Tensor, torch.Tensor, Cond, bool], torch.Tensor]


# ------------------------------------------------------------------------------ parameters
def check_variant(variant: str) -> str:
    """Normalise ``'esd-x'``/``'x'``… to one of :data:`VARIANTS`; raise naming a bad value."""
    v = str(variant).strip().lower()
    if v.startswith("esd-"):
        v = v[4:]
    if v not in VARIANTS:
        raise ValueError(f"unknown ESD variant {variant!r}; one of {', '.join(VARIANTS)}")
    return v


def check_xt_sampler(xt_sampler: str) -> str:
    """``xt_sampler`` if it is one of :data:`XT_SAMPLERS`; raise naming a bad value."""
    if xt_sampler not in XT_SAMPLERS:
        raise ValueError(f"unknown xt_sampler {xt_sampler!r}; one of {XT_SAMPLERS}")
    return xt_sampler


def _module_selected(module_name: str, variant: str) -> bool:
    if variant == "x":
        return "attn2" in module_name.split(".")
    if variant == "u":
        return "attn2" not in module_name.split(".")
    return module_name.endswith(("attn2.to_k", "attn2.to_v"))


def select_parameters(module: torch.nn.Module, variant: str) -> list[str]:
    """Names (as in ``module.named_parameters()``/``state_dict()``) of the tensors that train.

    Raises ValueError naming the variant when it selects nothing (e.g. a model without
    cross-attention for ``x``)."""
    v = check_variant(variant)
    names = []
    for mname, m in module.named_modules():
        if not mname or not isinstance(m, TRAINABLE_TYPES) or not _module_selected(mname, v):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p is not None:
                names.append(f"{mname}.{pname}")
    if not names:
        raise ValueError(f"ESD variant {variant!r} selects no parameters of this {type(module).__name__} "
                         f"(no Linear/Conv2d module matches)")
    return names


def replacement_and_patch(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]):
    """(replacement tensors for the file, differences for ModelPatcher ``diff`` patches).

    The file holds θ0 + Δ in the base weights' dtype (what the Unlearned UNet Loader copies in at
    strength 1). For float32 weights the patch is Δ itself: ComfyUI computes θ0 + 1.0·Δ in
    float32, bit-identical to the stored replacement. For half-precision weights the patch is the
    difference to the *rounded* replacement, so both paths land on the same representable value.
    """
    targets, patches = {}, {}
    for k, d in deltas.items():
        b = base[k]
        t = (b.float() + d.detach().float().to(b.device)).to(b.dtype)
        targets[k] = t.detach().cpu().contiguous()
        patches[k] = d.detach().float() if b.dtype == torch.float32 else (t.float() - b.float())
        if not bool(torch.isfinite(targets[k]).all()):
            raise FloatingPointError(f"trained tensor {k} holds NaN/inf; lower the learning rate")
    return targets, patches


# ------------------------------------------------------------------------------ conditions
def _lcm_repeat(t: torch.Tensor, length: int) -> torch.Tensor:
    return t if t.shape[1] == length else t.repeat(1, length // t.shape[1], 1)


def cat_conds(conds, batch_sizes=None) -> Cond:
    """Concatenate conditions along the batch; token lengths are repeated to their LCM (as
    ComfyUI does when batching conds of different chunk counts). ``batch_sizes[i]`` expands a
    batch-1 condition to that many rows."""
    conds = list(conds)
    sizes = batch_sizes or [c[0].shape[0] for c in conds]
    length = 1
    for c, _ in conds:
        length = length * c.shape[1] // math.gcd(length, c.shape[1])
    xs, ps = [], []
    for (c, p), n in zip(conds, sizes):
        xs.append(_lcm_repeat(c, length).expand(n, -1, -1) if c.shape[0] == 1 else _lcm_repeat(c, length))
        if p is not None:
            ps.append(p.expand(n, -1) if p.shape[0] == 1 else p)
    pooled = torch.cat(ps) if len(ps) == len(conds) else None
    return torch.cat(xs), pooled


# ------------------------------------------------------------------------------ schedule / sampling
def ddim_sigmas(train_sigmas: torch.Tensor, n: int) -> torch.Tensor:
    """σ of an N-step sampling schedule, descending (first = σ_max): N timesteps evenly spaced
    over the model's training timesteps (``train_sigmas`` ascending, one per timestep)."""
    if n < 1:
        raise ValueError(f"sampling steps must be ≥ 1, got {n}")
    T = train_sigmas.shape[0]
    idx = torch.linspace(T - 1, 0, n).round().long()
    return train_sigmas.float()[idx]


def start_noise(noise: torch.Tensor, sigma_max: torch.Tensor) -> torch.Tensor:
    """x_T for a variance-preserving model in k-diffusion space: ε·√(1+σ_max²) (ComfyUI's
    ``noise_scaling`` for a full denoise)."""
    return noise * torch.sqrt(1.0 + sigma_max.float() ** 2)


def guided(eps_null: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_null + scale * (eps_cond - eps_null)


@torch.no_grad()
def sample_until(eps_fn: EpsFn, noise: torch.Tensor, sigmas: torch.Tensor, k: int, cond: Cond, null: Cond,
                 guidance: float, erased: bool) -> torch.Tensor:
    """x at ``sigmas[k]`` after k guided DDIM (η=0) steps from pure noise. Rows of ``noise`` pair
    with rows of ``cond`` (or a batch-1 cond for all rows)."""
    b = noise.shape[0]
    x = start_noise(noise, sigmas[0])
    both = cat_conds([null, cond], [b, b])
    for i in range(int(k)):
        s = sigmas[i].expand(2 * b)
        e = eps_fn(torch.cat([x, x]), s, both, erased)
        e_null, e_cond = e.chunk(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * guided(e_null, e_cond, guidance)
    return x


# ------------------------------------------------------------------------------ objective
def esd_target(eps_null: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ε* = ε0(∅) − η(ε0(c) − ε0(∅))."""
    return eps_null - float(eta) * (eps_concept - eps_null)


def esd_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(pred.float(), target.float())


@torch.no_grad()
def frozen_target(eps_fn: EpsFn, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, null: Cond,
                  eta: float) -> torch.Tensor:
    """ε* at (x, σ) from the frozen model (one batched call for ∅ and c)."""
    b = x.shape[0]
    e = eps_fn(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_conds([null, cond], [b, b]), False)
    e_null, e_c = e.chunk(2)
    return esd_target(e_null, e_c, eta)


def draw_point(g: torch.Generator, n_steps: int, latent_shape) -> tuple[int, torch.Tensor]:
    """One training point's randomness: the DDIM step k ∈ [0, N) and the start noise."""
    k = int(torch.randint(0, n_steps, (1,), generator=g))
    return k, torch.randn(tuple(latent_shape), generator=g)


def make_esd_loss_fn(eps_fn: EpsFn, concept: Cond, null: Cond, sigmas: torch.Tensor, latent_shape,
                     eta: float = 1.0, start_guidance: float = 3.0, xt_sampler: str = "erased"):
    """``loss_fn(step, generator)`` for :func:`safegen_core.training.train` (ESD objective).

    ``sigmas``: the N-step schedule from :func:`ddim_sigmas`; ``latent_shape``: [1, C, h, w].
    ``loss_fn.last`` holds the last step's (k, σ) for reporting."""
    check_xt_sampler(xt_sampler)
    n = sigmas.shape[0]

    def loss_fn(step, g):
        k, noise = draw_point(g, n, latent_shape)
        x = sample_until(eps_fn, noise, sigmas, k, concept, null, start_guidance, xt_sampler == "erased")
        sigma = sigmas[k].expand(x.shape[0])
        target = frozen_target(eps_fn, x, sigma, concept, null, eta)
        pred = eps_fn(x, sigma, cat_conds([concept], [x.shape[0]]), True)
        loss_fn.last = (k, float(sigma[0]))
        return esd_loss(pred, target)

    loss_fn.last = (None, None)
    return loss_fn


@torch.no_grad()
def eval_points(eps_fn: EpsFn, concept: Cond, null: Cond, sigmas: torch.Tensor, latent_shape, n_points: int,
                seed: int, start_guidance: float = 3.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation points (x_t, σ): partial samples of the *frozen* model conditioned on the
    concept, k spread over the schedule — independent of the weights being trained, so a
    before/after comparison is paired."""
    g = torch.Generator().manual_seed(int(seed))
    out = []
    n = sigmas.shape[0]
    for i in range(n_points):
        k = (i * n) // max(1, n_points)
        noise = torch.randn(tuple(latent_shape), generator=g)
        x = sample_until(eps_fn, noise, sigmas, k, concept, null, start_guidance, False)
        out.append((x, sigmas[k].expand(x.shape[0])))
    return out


@torch.no_grad()
def target_error(eps_fn: EpsFn, points, concept: Cond, null: Cond, eta: float, erased: bool) -> float:
    """Mean over ``points`` of MSE(ε(x, c), ε*(x)) — how far the (erased or original) concept
    prediction is from the ESD target."""
    errs = []
    for x, s in points:
        target = frozen_target(eps_fn, x, s, concept, null, eta)
        pred = eps_fn(x, s, cat_conds([concept], [x.shape[0]]), erased)
        errs.append(float(esd_loss(pred, target)))
    return sum(errs) / len(errs)


@torch.no_grad()
def relative_change(eps_fn: EpsFn, points, cond: Cond) -> float:
    """‖ε_θ(x, b) − ε_θ0(x, b)‖ / ‖ε_θ0(x, b)‖ over ``points`` (all rows stacked): how much a
    prompt's prediction moved."""
    num = den = 0.0
    for x, s in points:
        c = cat_conds([cond], [x.shape[0]])
        a, b = eps_fn(x, s, c, True).float(), eps_fn(x, s, c, False).float()
        num += float((a - b).pow(2).sum())
        den += float(b.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))
