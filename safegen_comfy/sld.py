"""SLD (Safe Latent Diffusion) in ComfyUI's sampler; the formulas are ``safegen_core.sld``'s.

SLD as a MODEL patch (stock KSampler):
  * the safety conditioning is a :class:`.batched_cond.ExtraCond`: prepared by ComfyUI's own
    ``process_conds`` like positive/negative and predicted in the same batched UNet call
    (3·B rows); its OUTER_SAMPLE hook also resets the SLD state at the start of every run.
  * ``sampler_post_cfg_function``: SLD via ``sld_cfg_from_denoised`` with the run's state; the
    step index is the current sigma's position in the sampler's schedule.
SLD as a GUIDER (SamplerCustomAdvanced): :class:`Guider_SLD`, a ``CFGGuider`` with a third cond
(like comfy_extras/nodes_perpneg.py ``Guider_PerpNeg``). ComfyUI internals via :mod:`.compat`.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import torch

from ..safegen_core.sld import (DEFAULT_SAFETY_CONCEPT, SLD_PRESETS, SLDParams, SLDState,
                                sld_cfg_from_denoised, sld_enabled, sigma_to_step_index)
from . import batched_cond, compat

log = logging.getLogger("safegen")

SAFETY_COND_KEY = "safegen_sld_safety"
WRAPPER_KEY = SAFETY_COND_KEY  # the OUTER_SAMPLE wrapper of its ExtraCond
PRESETS = ["weak", "medium", "strong", "max", "custom"]
DEFAULTS = SLD_PRESETS["medium"]

__all__ = ["sld_params", "SLDRun", "patch_model_sld", "Guider_SLD", "sld_guider", "sld_run_of",
           "DEFAULT_SAFETY_CONCEPT", "PRESETS", "DEFAULTS"]


def sld_params(preset: str, warmup_steps: int, guidance_scale: float, threshold: float,
               momentum_scale: float, momentum_beta: float) -> SLDParams:
    """The preset's values, or the custom ones when ``preset == "custom"``."""
    if preset == "custom":
        return SLDParams(warmup_steps=int(warmup_steps), guidance_scale=float(guidance_scale),
                         threshold=float(threshold), momentum_scale=float(momentum_scale),
                         momentum_beta=float(momentum_beta))
    if preset not in SLD_PRESETS:
        raise ValueError(f"unknown SLD preset {preset!r}; choose one of {PRESETS}")
    return replace(SLD_PRESETS[preset])


class SLDRun:
    """SLD state of one patched model / guider across its sampling runs.

    ``state`` (the momentum, one entry per latent element, so per image) is reset at the start
    of each run: by the OUTER_SAMPLE wrapper / ``Guider_SLD.sample`` (every KSampler /
    SamplerCustom* run goes through ``CFGGuider.sample``) and, as a fallback for code paths
    that bypass it, when the sampler's schedule object changes or the step index falls back to
    0 after a later step.
    """

    def __init__(self, params: SLDParams):
        self.params = params
        self.state = SLDState()
        self.guider = None
        self.cfg: Optional[float] = None
        self.schedule = None
        self.last_step = -1
        self.pending = None  # (x, safety x0 prediction, step index, n_steps) for the next CFG hook call
        self.runs = 0
        self.safety_evals = 0
        self._warned = set()

    def new_run(self) -> None:
        self.state.reset()
        self.schedule = None
        self.last_step = -1
        self.pending = None
        self.runs += 1

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)

    def step_index(self, sigma, model_options: dict) -> tuple[int, int | None]:
        """(step index in this run, number of steps or None); resets state on a new run.

        The step is the nearest entry of the sampler's schedule. A sampler that evaluates the model
        twice per step (Heun: at sigma_i and sigma_i+1; DPM2: at sigma_i and a midpoint) repeats an
        index; the momentum advances at the first evaluation of each index only (``SLDState``), so
        once per step.
        """
        sched = compat.sample_sigmas(model_options)
        if sched is None:
            self._warn("sched", "SafeGen SLD: no sample_sigmas in transformer_options; counting steps as "
                                "momentum updates and the warm-up in absolute steps")
            return self.state.calls, None
        if sched is not self.schedule:
            if self.schedule is not None:  # a schedule we have not seen: a new run
                self.new_run()
            self.schedule = sched
        idx = sigma_to_step_index(sigma, sched)
        if idx == 0 and self.last_step > 0:  # back at the first sigma with the same schedule object
            self.new_run()
            self.schedule = sched
        self.last_step = idx
        return idx, int(sched.shape[-1]) - 1

    def wants_safety(self, cfg: Optional[float], n_steps: Optional[int]) -> bool:
        """Whether the safety prediction can matter for this run (else it is not computed)."""
        p = self.params
        if not p.guidance_scale > 1.0:
            return False
        if cfg is not None and not cfg > 1.0:
            return False
        if n_steps is not None and p.warmup(n_steps) >= n_steps:
            return False  # all steps are warm-up steps: SLD never changes the prediction
        return True

    def apply(self, x, sigma, cond_d, uncond_d, safety_d, denoised, cfg, step, n_steps=None) -> torch.Tensor:
        """SLD on x0 predictions; ``denoised`` is the CFG result the sampler computed so far.

        Advances the momentum once per step (warm-up included, as diffusers does). During
        warm-up ``denoised`` is returned unchanged; afterwards ``sld + (denoised - plain_cfg)``,
        which is exactly the SLD result when nothing else modified the CFG result and keeps
        another hook's modification otherwise.
        """
        if not sld_enabled(self.params, cfg):
            return denoised
        sld = sld_cfg_from_denoised(x, uncond_d, cond_d, safety_d, sigma, step, self.params, self.state, cfg,
                                    n_steps)
        if step < self.params.warmup(n_steps):
            return denoised
        plain = uncond_d + (cond_d - uncond_d) * cfg
        return sld + (denoised - plain)


def patch_model_sld(model, safety, params: SLDParams):
    """Clone ``model`` and install SLD (see module docstring). Returns the clone."""
    m = model.clone()
    run = SLDRun(params)
    extra = batched_cond.ExtraCond(SAFETY_COND_KEY, safety, prompt_type="negative", control_from="negative")

    def on_run_start(guider, args, kwargs):
        run.new_run()
        run.guider = guider
        run.cfg = compat.guider_cfg(guider)

    def on_run_end():
        run.guider = None
        run.cfg = None

    def wants(args):
        run.pending = None
        step, n_steps = run.step_index(args["sigma"], args["model_options"])
        run.current = (step, n_steps)
        return run.wants_safety(run.cfg, n_steps)

    def consume(args, safety_d):
        step, n_steps = run.current
        run.pending = (args["input"], safety_d, step, n_steps)
        run.safety_evals += 1

    def post_cfg(args):
        denoised = args["denoised"]
        p, run.pending = run.pending, None
        if p is None or p[0] is not args["input"]:
            return denoised
        _, safety_d, step, n_steps = p
        return run.apply(args["input"], args["sigma"], args["cond_denoised"], args["uncond_denoised"],
                         safety_d, denoised, args["cond_scale"], step, n_steps)

    calc = extra.install(m, consume=consume, wants=wants, on_run_start=on_run_start, on_run_end=on_run_end)
    # function attributes survive ModelPatcher.clone (deepcopy keeps function objects)
    calc.safegen_run = run
    post_cfg.safegen_run = run
    m.set_model_sampler_post_cfg_function(post_cfg)
    return m


def sld_run_of(model) -> Optional[SLDRun]:
    """The SLDRun of a model patched by :func:`patch_model_sld` (for tests and reports)."""
    fn = model.model_options.get("sampler_calc_cond_batch_function")
    return getattr(fn, "safegen_run", None)


class Guider_SLD(compat.cfg_guider_class()):
    """CFG + SLD with the safety prediction batched with positive and negative."""

    def set_conds(self, positive, negative, safety):
        safety = compat.conditioning_set_values(safety, {"prompt_type": "negative"})
        self.inner_set_conds({"positive": positive, "negative": negative, "safety": safety})
        self.safety_extra = batched_cond.ExtraCond("safety", safety)

    def set_sld(self, cfg: float, params: SLDParams):
        self.cfg = cfg
        self.run = SLDRun(params)

    def sample(self, *args, **kwargs):
        self.run.new_run()
        if "safety" in self.original_conds:
            self.original_conds["safety"] = self.safety_extra.for_run(self.original_conds)
        return super().sample(*args, **kwargs)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        run = self.run
        step, n_steps = run.step_index(timestep, model_options)
        positive = self.conds.get("positive", None)
        negative = self.conds.get("negative", None)
        safety = self.conds.get("safety", None)
        if safety is None or not run.wants_safety(self.cfg, n_steps):
            return super().predict_noise(x, timestep, model_options, seed)
        conds = [positive, negative, safety]
        out = compat.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        safety_d = out[2]
        out = list(out[:2])
        run.safety_evals += 1
        # pre-CFG hooks see [cond, uncond] as in sampling_function
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds[:2], "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            out = fn(args)
        denoised = compat.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep, model_options,
                                       positive, negative)
        return run.apply(x, timestep, out[0], out[1], safety_d, denoised, self.cfg, step, n_steps)



def sld_guider(model, positive, negative, safety, cfg: float, params: SLDParams) -> Guider_SLD:
    guider = Guider_SLD(model)
    guider.set_conds(positive, negative, safety)
    guider.set_sld(cfg, params)
    return guider
