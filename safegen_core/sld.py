"""Safe Latent Diffusion (SLD) guidance — pure torch, no ComfyUI import.

Numerical reference: diffusers 0.42.1
``diffusers/pipelines/deprecated/stable_diffusion_safe/pipeline_stable_diffusion_safe.py``,
``StableDiffusionPipelineSafe.__call__`` — the guidance that actually runs is inline in the
denoising loop (lines 700-742 of that file: CFG split at 702-706, "Perform SLD guidance"
709-740, final CFG at 742; ``enable_safety_guidance`` at 640, ``safety_momentum = None`` at 683;
``perform_safety_guidance`` at 452-493 is the same code but is never called).
Presets: ``SafetyConfig`` in the package ``__init__.py`` of the same folder (lines 21-49).
Paper: Schramowski et al., "Safe Latent Diffusion", CVPR 2023, equations 3-8 (the diffusers
comments name the equations).

The formula, per element, on epsilon (noise) predictions, for loop index ``i``::

    g      = eps_c - eps_u                                   # CFG direction
    d      = eps_c - eps_s                                   # distance to the safety concept
    scale  = min(|d| * sS, 1)                                # Eq. 6, per-element clamp (max=1 only)
    mu     = where(d >= lambda, 0, scale)                    # Eq. 6, threshold on (cond - safety)
    gamma  = mu * (eps_s - eps_u)                            # Eq. 4
    gamma  = gamma + sm * v                                  # Eq. 7  (v: momentum, starts at 0)
    v      = beta_m * v + (1 - beta_m) * gamma               # Eq. 8  (updated on EVERY step,
                                                             #         warm-up steps included)
    if i >= warmup: g = g - gamma                            # Eq. 3  (warm-up check AFTER the
                                                             #         momentum update)
    eps    = eps_u + cfg * g

Safety guidance is enabled only when ``sS > 1`` and ``cfg > 1`` (``enable_safety_guidance =
sld_guidance_scale > 1.0 and do_classifier_free_guidance``); when ``cfg <= 1`` the pipeline
does no CFG at all and returns the conditional prediction.  When disabled, the momentum is
left untouched.

ComfyUI's sampler works with denoised (x0) predictions in k-diffusion space
(``x = x0 + sigma * eps``), see :func:`sld_cfg_from_denoised`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "SLDParams",
    "SLD_PRESETS",
    "REFERENCE_STEPS",
    "DEFAULT_SAFETY_CONCEPT",
    "SLDState",
    "sld_enabled",
    "sld_safety_term",
    "sld_guidance",
    "sld_cfg_from_denoised",
    "sigma_to_step_index",
]


@dataclass(frozen=True)
class SLDParams:
    """SLD hyper-parameters, named after the diffusers ``sld_*`` arguments.

    warmup_steps   -- ``sld_warmup_steps``: the safety term is applied from loop index
                      ``warmup_steps`` on (``i >= sld_warmup_steps``).
    guidance_scale -- ``sld_guidance_scale`` (sS); SLD is disabled when ``<= 1``.
    threshold      -- ``sld_threshold`` (lambda) on ``eps_cond - eps_safety``.
    momentum_scale -- ``sld_momentum_scale`` (sm).
    momentum_beta  -- ``sld_mom_beta`` (beta_m).
    warmup_fraction -- when set (the presets), the warm-up is this fraction of the run's step count
                      (:meth:`warmup`), so it keeps its meaning in ComfyUI's step counts; ``None``
                      (custom values) keeps ``warmup_steps`` as an absolute step count.
    """

    warmup_steps: int = 10
    guidance_scale: float = 1000.0
    threshold: float = 0.01
    momentum_scale: float = 0.3
    momentum_beta: float = 0.4
    warmup_fraction: Optional[float] = None

    def warmup(self, n_steps: Optional[int] = None) -> int:
        """Warm-up in steps for a run of ``n_steps`` steps.

        Presets were tuned for diffusers' 50-step default (``REFERENCE_STEPS``): their warm-up is
        ``round(warmup_fraction * n_steps)`` (half up), e.g. MEDIUM 10/50 → 4 of ComfyUI's 20 steps,
        6 of 30, 10 of 50 (diffusers' index exactly).  Without a fraction, or when the step count is
        unknown, ``warmup_steps``.
        """
        if self.warmup_fraction is None or n_steps is None:
            return int(self.warmup_steps)
        return int(math.floor(self.warmup_fraction * int(n_steps) + 0.5))

    def to_diffusers_kwargs(self) -> dict:
        """The same values as keyword arguments of ``StableDiffusionPipelineSafe.__call__``."""
        return {
            "sld_warmup_steps": self.warmup_steps,
            "sld_guidance_scale": self.guidance_scale,
            "sld_threshold": self.threshold,
            "sld_momentum_scale": self.momentum_scale,
            "sld_mom_beta": self.momentum_beta,
        }


# diffusers ``SafetyConfig`` (stable_diffusion_safe/__init__.py lines 21-49), identical to the
# paper's hyper-parameter table and to methods.md.  The ``__call__`` defaults equal MEDIUM.
# Their warm-up counts steps of diffusers' default ``num_inference_steps=50`` (``REFERENCE_STEPS``);
# ``warmup_fraction`` keeps that share of the run for any step count (:meth:`SLDParams.warmup`).
REFERENCE_STEPS = 50


def _preset(warmup_steps: int, **kw) -> SLDParams:
    return SLDParams(warmup_steps=warmup_steps, warmup_fraction=warmup_steps / REFERENCE_STEPS, **kw)


SLD_PRESETS = {
    "weak": _preset(15, guidance_scale=20.0, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": _preset(10, guidance_scale=1000.0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": _preset(7, guidance_scale=2000.0, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": _preset(0, guidance_scale=5000.0, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}

# ``StableDiffusionPipelineSafe.__init__`` (pipeline file lines 80-84).  Note the diffusers text starts
# with "an image showing"; methods.md lists the concept words without that prefix.
DEFAULT_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child"
    " abuse, brutality, cruelty"
)


class SLDState:
    """Per-sampling-run SLD state: the safety momentum ``v``, one entry per latent element.

    Create a fresh object for every sampling run (diffusers sets ``safety_momentum = None``
    before its loop).  The momentum has the shape of the latent batch, so every image in a
    batch has its own momentum; all operations are element-wise, so images never interact.

    The momentum advances once per *step*: diffusers evaluates the model once per step and
    updates it there.  Samplers that evaluate the model several times per step (Heun, DPM2, ...)
    call :func:`sld_safety_term` with the same ``step_index`` again; those calls use the momentum
    the step started with and leave it unchanged.  ``calls`` counts momentum updates (= steps),
    ``evals`` all calls.  If a call arrives with a different shape (another batch), the momentum
    restarts at zero.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.momentum: Optional[torch.Tensor] = None
        self.start: Optional[torch.Tensor] = None  # momentum at the start of step ``step``
        self.step: Optional[int] = None
        self.calls: int = 0
        self.evals: int = 0

    def begin(self, step_index: int, ref: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(momentum to use at ``step_index``, whether this call advances it)."""
        if self.step == step_index and self.start is not None and self.start.shape == ref.shape:
            return self.start.to(device=ref.device, dtype=ref.dtype), False
        return self._momentum_like(ref), True

    def _momentum_like(self, ref: torch.Tensor) -> torch.Tensor:
        m = self.momentum
        if m is None or m.shape != ref.shape:
            m = torch.zeros_like(ref)
        elif m.device != ref.device or m.dtype != ref.dtype:
            m = m.to(device=ref.device, dtype=ref.dtype)
        return m


def sld_enabled(params: SLDParams, cfg_scale: float) -> bool:
    """``enable_safety_guidance = sld_guidance_scale > 1.0 and guidance_scale > 1.0`` (diffusers)."""
    return float(params.guidance_scale) > 1.0 and float(cfg_scale) > 1.0


def sld_safety_term(
    noise_uncond: torch.Tensor,
    noise_cond: torch.Tensor,
    noise_safety: torch.Tensor,
    step_index: int,
    params: SLDParams,
    state: SLDState,
    n_steps: Optional[int] = None,
) -> torch.Tensor:
    """Return the safety term subtracted from ``(eps_c - eps_u)`` at this step, updating momentum.

    Computes Eq. 6/4/7 (``gamma`` in the module docstring), updates ``state.momentum`` with
    Eq. 8 — on warm-up steps too, once per step (see :class:`SLDState`) — and returns ``gamma``
    if ``step_index >= params.warmup(n_steps)``, else a zero tensor (``n_steps``: the run's step
    count, for presets whose warm-up is a fraction of the run).  The final prediction is ``eps_u + cfg * (eps_c - eps_u - term)``.
    Follows the loop body of ``StableDiffusionPipelineSafe.__call__`` (diffusers 0.42.1, the
    block commented "Perform SLD guidance").  Does not check ``sld_enabled``; callers do.
    """
    momentum, advance = state.begin(step_index, noise_cond)
    gamma = _safety_gamma(noise_uncond, noise_cond, noise_safety, params, momentum)
    if advance:
        state.start, state.step = momentum, step_index
        state.momentum = params.momentum_beta * momentum + (1 - params.momentum_beta) * gamma
        state.calls += 1
    state.evals += 1
    if step_index >= params.warmup(n_steps):
        return gamma
    return torch.zeros_like(gamma)


def _safety_gamma(noise_uncond, noise_cond, noise_safety, params, momentum):
    # Same operations, same order as diffusers (bit-for-bit in the same dtype).
    scale = torch.clamp(torch.abs((noise_cond - noise_safety)) * params.guidance_scale, max=1.0)  # Eq. 6
    safety_concept_scale = torch.where(
        (noise_cond - noise_safety) >= params.threshold, torch.zeros_like(scale), scale
    )  # Eq. 6
    gamma = torch.mul((noise_safety - noise_uncond), safety_concept_scale)  # Eq. 4
    gamma = gamma + params.momentum_scale * momentum  # Eq. 7
    return gamma


def sld_guidance(
    noise_uncond: torch.Tensor,
    noise_cond: torch.Tensor,
    noise_safety: torch.Tensor,
    step_index: int,
    params: SLDParams,
    state: SLDState,
    cfg_scale: float,
    n_steps: Optional[int] = None,
) -> torch.Tensor:
    """The final epsilon prediction of ``StableDiffusionPipelineSafe`` for loop index ``step_index``.

    ``eps = eps_u + cfg * (eps_c - eps_u - [i >= warmup] * gamma)`` with ``gamma`` from
    :func:`sld_safety_term` (formula in the module docstring).  Inputs are epsilon predictions of
    the same shape (any batch size; each element independent).  Special cases copied from the
    pipeline: ``cfg_scale <= 1`` → returns ``noise_cond`` (no CFG, no SLD);
    ``params.guidance_scale <= 1`` → plain CFG, momentum untouched.
    """
    if not float(cfg_scale) > 1.0:
        return noise_cond
    noise_guidance = noise_cond - noise_uncond
    if sld_enabled(params, cfg_scale):
        # Eq. 3; the term is zero during warm-up (checked after the momentum update, Eq. 8)
        noise_guidance = noise_guidance - sld_safety_term(noise_uncond, noise_cond, noise_safety, step_index,
                                                          params, state, n_steps)
    return noise_uncond + cfg_scale * noise_guidance


def _sigma_like(sigma: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        return s.reshape([1] * x.ndim)
    s = s.reshape(-1)
    if s.numel() == 1:
        return s.reshape([1] * x.ndim)
    if s.numel() != x.shape[0]:
        raise ValueError(f"sigma has {s.numel()} entries but the batch has {x.shape[0]}")
    return s.reshape([x.shape[0]] + [1] * (x.ndim - 1))


def sld_cfg_from_denoised(
    x: torch.Tensor,
    denoised_uncond: torch.Tensor,
    denoised_cond: torch.Tensor,
    denoised_safety: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    step_index: int,
    params: SLDParams,
    state: SLDState,
    cfg_scale: float,
    n_steps: Optional[int] = None,
) -> torch.Tensor:
    """SLD + CFG for k-diffusion samplers that work with denoised (x0) predictions.

    ComfyUI: ``x = x0 + sigma * eps``; its cfg hook gets ``cond = x - x0_cond = sigma * eps``.
    SLD's threshold and per-element scale are defined on epsilon, so each prediction is
    converted with ``eps_k = (x - x0_k) / sigma``, :func:`sld_guidance` is applied, and the
    result converted back: ``x0 = x - sigma * eps``.  ``sigma`` may be a float, a 0-d tensor or
    a per-sample tensor of shape ``(B,)``.  Samples with ``sigma == 0`` (never evaluated by
    ComfyUI's samplers) get plain x0-space CFG, as epsilon is undefined there.
    """
    s = _sigma_like(sigma, x)
    zero = s == 0
    s_safe = torch.where(zero, torch.ones_like(s), s)
    eps_u = (x - denoised_uncond) / s_safe
    eps_c = (x - denoised_cond) / s_safe
    eps_s = (x - denoised_safety) / s_safe
    eps = sld_guidance(eps_u, eps_c, eps_s, step_index, params, state, cfg_scale, n_steps)
    out = x - s_safe * eps
    if bool(zero.any()):
        plain = denoised_uncond + (denoised_cond - denoised_uncond) * cfg_scale
        out = torch.where(zero.expand_as(out), plain, out)
    return out


def sigma_to_step_index(
    sigma: Union[float, torch.Tensor], sigmas: Union[Sequence[float], torch.Tensor]
) -> int:
    """Index of the step of the sampler's schedule whose sigma is nearest to ``sigma``.

    ``sigmas`` is the sampler's full schedule (ComfyUI: ``transformer_options["sample_sigmas"]``,
    decreasing, usually ending with 0); step ``i`` evaluates the model at ``sigmas[i]``, like the
    diffusers loop index ``i``.  A per-sample ``sigma`` tensor uses its first entry (all samples
    of a batch share the step).  Ties go to the earlier (larger-sigma) step.  Intermediate
    evaluations of multi-stage samplers (e.g. Heun's second evaluation at ``sigmas[i+1]``) map to
    the nearest schedule entry.
    """
    sched = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
    if sched.numel() == 0:
        raise ValueError("empty sigma schedule")
    s = float(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)[0])
    return int(torch.argmin(torch.abs(sched - s)).item())
