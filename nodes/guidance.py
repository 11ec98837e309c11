"""Training-free guidance nodes: SLD (safe latent diffusion) and SAFREE, adapted to ComfyUI's sampler.

The formulas live in ``safegen_core.sld`` / ``safegen_core.safree``; this module only wires them
into ComfyUI (0.3.75, comfy/samplers.py):

SLD as a MODEL patch (stock KSampler):
  * ``WrappersMP.OUTER_SAMPLE`` wrapper: at the start of every sampling run it resets the SLD
    state and adds the safety conditioning to the guider's ``conds`` dict, so ComfyUI's own
    ``process_conds`` prepares it exactly like positive/negative (areas/masks, start/end percent,
    ``extra_conds`` → c_crossattn, SDXL ``y``, inpaint concat, controlnets).
  * ``sampler_calc_cond_batch_function``: evaluates ``[cond, uncond, safety]`` with ONE
    ``comfy.samplers.calc_cond_batch`` call, which concatenates compatible conds into the same
    batched UNet call (3·B rows); returns ``[cond, uncond]`` to the rest of the sampler and keeps
    the safety prediction for the CFG hook.
  * ``sampler_post_cfg_function``: SLD via ``sld_cfg_from_denoised`` with the run's state; the
    step index is the current sigma's position in ``transformer_options["sample_sigmas"]``.
SLD as a GUIDER (SamplerCustomAdvanced): ``Guider_SLD``, a ``CFGGuider`` with a third cond
(like comfy_extras/nodes_perpneg.py ``Guider_PerpNeg``).
SAFREE: a conditioning filter (token projection + self-validating step window via
``start_percent``/``end_percent``) and a FreeU-style output-block patch (latent re-attention).
"""
from __future__ import annotations

import hashlib
import logging
import weakref
from dataclasses import replace
from typing import Optional

import torch

import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import node_helpers
from comfy_api.latest import io, ui

from ..safegen_core import inversion as INV
from ..safegen_core import safree as SF
from ..safegen_core.sld import (DEFAULT_SAFETY_CONCEPT, SLD_PRESETS, SLDParams, SLDState,
                                sld_cfg_from_denoised, sld_enabled, sigma_to_step_index)
from . import comfy_glue as G

log = logging.getLogger("safegen")

Embedding = io.Custom("EMBEDDING")
CATEGORY = "SafeGen/guidance"
SAFETY_COND_KEY = "safegen_sld_safety"
WRAPPER_KEY = "safegen_sld"
PRESETS = ["weak", "medium", "strong", "max", "custom"]

__all__ = ["sld_params", "SLDRun", "patch_model_sld", "Guider_SLD", "safree_filter",
           "patch_model_reattention", "NODES", "DEFAULT_SAFETY_CONCEPT"]


# =========================================================================== SLD
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


def _first_sigma(sigma) -> float:
    return float(torch.as_tensor(sigma).reshape(-1)[0])


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
        self.pending = None  # (x, safety x0 prediction, step index) for the next CFG hook call
        self.runs = 0
        self.safety_evals = 0
        self._warned = False

    def new_run(self) -> None:
        self.state.reset()
        self.schedule = None
        self.last_step = -1
        self.pending = None
        self.runs += 1

    def step_index(self, sigma, model_options: dict) -> tuple[int, int | None]:
        """(step index in this run, number of steps or None); resets state on a new run."""
        sched = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sched is None:
            if not self._warned:
                log.warning("SafeGen SLD: no sample_sigmas in transformer_options; counting model "
                            "evaluations as steps")
                self._warned = True
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
        if n_steps is not None and p.warmup_steps >= n_steps:
            return False  # all steps are warm-up steps: SLD never changes the prediction
        return True

    def apply(self, x, sigma, cond_d, uncond_d, safety_d, denoised, cfg, step) -> torch.Tensor:
        """SLD on x0 predictions; ``denoised`` is the CFG result the sampler computed so far.

        Updates the momentum on every evaluation (warm-up included, as diffusers does). During
        warm-up ``denoised`` is returned unchanged; afterwards ``sld + (denoised - plain_cfg)``,
        which is exactly the SLD result when nothing else modified the CFG result and keeps
        another hook's modification otherwise.
        """
        if not sld_enabled(self.params, cfg):
            return denoised
        sld = sld_cfg_from_denoised(x, uncond_d, cond_d, safety_d, sigma, step, self.params, self.state, cfg)
        if step < self.params.warmup_steps:
            return denoised
        plain = uncond_d + (cond_d - uncond_d) * cfg
        return sld + (denoised - plain)


def _convert_safety(safety) -> list[dict]:
    safety = node_helpers.conditioning_set_values(safety, {"prompt_type": "negative"})
    return comfy.sampler_helpers.convert_cond(safety)


def _safety_for_run(safety_conds: list[dict], negative: Optional[list]) -> list[dict]:
    """Fresh copies of the safety conds; a ControlNet on the negative is applied to them too, so the
    safety prediction sees the same control as the unconditional one (and batches with it)."""
    out = [c.copy() for c in safety_conds]
    ctrl = next((c["control"] for c in (negative or []) if c.get("control") is not None), None)
    if ctrl is not None:
        for c in out:
            c.setdefault("control", ctrl)
    return out


def patch_model_sld(model, safety, params: SLDParams):
    """Clone ``model`` and install SLD (see module docstring). Returns the clone."""
    m = model.clone()
    run = SLDRun(params)
    safety_conds = _convert_safety(safety)
    prev_calc = m.model_options.get("sampler_calc_cond_batch_function")
    fallback = {}

    def outer_sample_wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        run.new_run()
        run.guider = guider
        run.cfg = getattr(guider, "cfg", None)
        conds = getattr(guider, "conds", None)
        if isinstance(conds, dict):
            conds[SAFETY_COND_KEY] = _safety_for_run(safety_conds, conds.get("negative"))
        try:
            return executor(*args, **kwargs)
        finally:
            run.guider = None
            run.cfg = None

    def processed_safety(model_base, x):
        g = run.guider
        if g is not None and isinstance(getattr(g, "conds", None), dict) and SAFETY_COND_KEY in g.conds:
            return g.conds[SAFETY_COND_KEY]
        # Sampling that did not go through CFGGuider.sample: prepare it as Perp-Neg's model patch does.
        key = (tuple(x.shape), str(x.device), id(model_base))
        if key not in fallback:
            conds = [c.copy() for c in safety_conds]
            comfy.samplers.calculate_start_end_timesteps(model_base, conds)
            fallback.clear()
            fallback[key] = comfy.samplers.encode_model_conds(model_base.extra_conds, conds, x, x.device,
                                                              "negative")
        return fallback[key]

    def calc_cond_batch(args):
        conds = list(args["conds"])
        run.pending = None

        def evaluate(cs):
            if prev_calc is not None:
                return prev_calc({**args, "conds": cs})
            return comfy.samplers.calc_cond_batch(args["model"], cs, args["input"], args["sigma"],
                                                  args["model_options"])

        if len(conds) < 2 or conds[0] is None or conds[1] is None:  # cfg == 1 optimisation: no CFG, no SLD
            return evaluate(conds)
        step, n_steps = run.step_index(args["sigma"], args["model_options"])
        if not run.wants_safety(run.cfg, n_steps):
            return evaluate(conds)
        x = args["input"]
        out = evaluate(conds + [processed_safety(args["model"], x)])
        run.pending = (x, out[len(conds)], step)
        run.safety_evals += 1
        return list(out[:len(conds)])

    def post_cfg(args):
        denoised = args["denoised"]
        p, run.pending = run.pending, None
        if p is None or p[0] is not args["input"]:
            return denoised
        _, safety_d, step = p
        return run.apply(args["input"], args["sigma"], args["cond_denoised"], args["uncond_denoised"],
                         safety_d, denoised, args["cond_scale"], step)

    # function attributes survive ModelPatcher.clone (deepcopy keeps function objects)
    calc_cond_batch.safegen_run = run
    post_cfg.safegen_run = run
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    m.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
    m.set_model_sampler_post_cfg_function(post_cfg)
    return m


def sld_run_of(model) -> Optional[SLDRun]:
    """The SLDRun of a model patched by :func:`patch_model_sld` (for tests and reports)."""
    fn = model.model_options.get("sampler_calc_cond_batch_function")
    return getattr(fn, "safegen_run", None)


class Guider_SLD(comfy.samplers.CFGGuider):
    """CFG + SLD with the safety prediction batched with positive and negative."""

    def set_conds(self, positive, negative, safety):
        safety = node_helpers.conditioning_set_values(safety, {"prompt_type": "negative"})
        self.inner_set_conds({"positive": positive, "negative": negative, "safety": safety})

    def set_sld(self, cfg: float, params: SLDParams):
        self.cfg = cfg
        self.run = SLDRun(params)

    def sample(self, *args, **kwargs):
        self.run.new_run()
        if "safety" in self.original_conds:
            self.original_conds["safety"] = _safety_for_run(self.original_conds["safety"],
                                                            self.original_conds.get("negative"))
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
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        safety_d = out[2]
        out = list(out[:2])
        run.safety_evals += 1
        # pre-CFG hooks see [cond, uncond] as in sampling_function
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds[:2], "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            out = fn(args)
        denoised = comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                               model_options=model_options, cond=positive, uncond=negative)
        return run.apply(x, timestep, out[0], out[1], safety_d, denoised, self.cfg, step)


def _sld_inputs():
    d = SLD_PRESETS["medium"]
    return [
        io.Combo.Input("preset", options=PRESETS, default="medium",
                       tooltip="SLD hyper-parameter set of the paper / diffusers SafetyConfig "
                               "(warmup/scale/threshold/momentum/beta): weak 15/20/0.0/0.0/0.0, "
                               "medium 10/1000/0.01/0.3/0.4, strong 7/2000/0.025/0.5/0.7, "
                               "max 0/5000/1.0/0.5/0.7. 'custom' uses the values below."),
        io.Int.Input("warmup_steps", default=d.warmup_steps, min=0, max=10000,
                     tooltip="custom: the safety term applies from this step index on (momentum is "
                             "accumulated during warm-up)."),
        io.Float.Input("guidance_scale", default=d.guidance_scale, min=0.0, max=100000.0, step=1.0,
                       tooltip="custom: SLD scale sS (per-element scale min(|eps_c - eps_s|·sS, 1)); "
                               "<= 1 disables SLD."),
        io.Float.Input("threshold", default=d.threshold, min=-10.0, max=10.0, step=0.001, round=0.0001,
                       tooltip="custom: lambda; elements where eps_c - eps_s >= lambda get no safety term."),
        io.Float.Input("momentum_scale", default=d.momentum_scale, min=0.0, max=10.0, step=0.01,
                       tooltip="custom: sm, weight of the safety momentum."),
        io.Float.Input("momentum_beta", default=d.momentum_beta, min=0.0, max=1.0, step=0.01,
                       tooltip="custom: beta_m, momentum decay."),
    ]


class SLDGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_SLDGuidance",
            display_name="SLD Safety Guidance",
            category=CATEGORY,
            description=(
                "Safe Latent Diffusion: patches the MODEL so the stock KSampler steers away from a safety "
                "concept. The safety conditioning (a CLIPTextEncode of the concept text, or an implicit "
                "negative embedding from 'Load Implicit Negative Embedding') is predicted in the same batch "
                "as positive and negative; the guidance follows diffusers' StableDiffusionPipelineSafe. "
                "Active only when the sampler's cfg > 1. Steps are counted on the sampler's schedule."),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (SD1.x or SDXL)."),
                io.Conditioning.Input("safety", tooltip="Safety concept C_S: e.g. CLIPTextEncode of "
                                                        "the SLD default concept text, or an INE."),
                *_sld_inputs(),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with SLD; use with KSampler.")],
        )

    @classmethod
    def execute(cls, model, safety, preset, warmup_steps, guidance_scale, threshold, momentum_scale,
                momentum_beta) -> io.NodeOutput:
        params = sld_params(preset, warmup_steps, guidance_scale, threshold, momentum_scale, momentum_beta)
        return io.NodeOutput(patch_model_sld(model, safety, params))


class SLDGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_SLDGuider",
            display_name="SLD Guider",
            category=CATEGORY,
            description=(
                "GUIDER for SamplerCustomAdvanced: classifier-free guidance plus Safe Latent Diffusion, "
                "with positive, negative and safety predicted in one batch."),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (SD1.x or SDXL)."),
                io.Conditioning.Input("positive", tooltip="The prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (CFG's unconditional)."),
                io.Conditioning.Input("safety",
                                      tooltip="Safety concept C_S (text or implicit negative embedding)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale; SLD is active only when cfg > 1."),
                *_sld_inputs(),
            ],
            outputs=[io.Guider.Output(display_name="GUIDER", tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, safety, cfg, preset, warmup_steps, guidance_scale, threshold,
                momentum_scale, momentum_beta) -> io.NodeOutput:
        params = sld_params(preset, warmup_steps, guidance_scale, threshold, momentum_scale, momentum_beta)
        guider = Guider_SLD(model)
        guider.set_conds(positive, negative, safety)
        guider.set_sld(cfg, params)
        return io.NodeOutput(guider)


# =========================================================================== SAFREE
ENCODER_ORDER = ("l", "g")  # SDXL conditioning is cat([clip_l, clip_g], -1); SD1 is clip_l only


def _layout(clip) -> list[tuple[str, int, int]]:
    """[(encoder, offset, width)] of the conditioning's feature axis."""
    widths = G.embedding_widths(clip)
    out, off = [], 0
    for enc in ENCODER_ORDER:
        if enc in widths:
            out.append((enc, off, widths[enc]))
            off += widths[enc]
    return out


def _is_real(tok, tokenizer) -> bool:
    return not (isinstance(tok, int) and tok in (tokenizer.start_token, tokenizer.end_token))


def _eos_index(chunk, tokenizer) -> int:
    """Position of the first end token of a 77-token chunk (the pooled position)."""
    for i, t in enumerate(chunk):
        if i > 0 and isinstance(t[0], int) and t[0] == tokenizer.end_token:
            return i
    return len(chunk) - 1


def _unit_weights(chunk):
    return [(t[0], 1.0) for t in chunk]


def _encode_chunks(clip, enc: str, chunks: list) -> torch.Tensor:
    """Hidden states of the conditioning layer for each chunk: (n, 77, width) — one batched call.

    Same layer and options as ``CLIP.encode_from_tokens`` (``clip_layer`` honoured).
    """
    if not chunks:
        raise ValueError("nothing to encode")
    cm = clip.cond_stage_model
    cm.reset_clip_options()
    if clip.layer_idx is not None:
        cm.set_clip_options({"layer": clip.layer_idx})
    clip.load_model()
    sub = getattr(cm, f"clip_{enc}")
    out = sub.encode_token_weights([_unit_weights(c) for c in chunks])[0]
    return out.reshape(len(chunks), -1, out.shape[-1]).float()


_POOLED_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_POOLED_CACHE_SIZE = 1024  # vectors per text-encoder module (a few MB)


def _token_key(tok) -> object:
    if isinstance(tok, torch.Tensor):
        t = tok.detach().float().cpu().contiguous()
        return ("emb", tuple(t.shape), hashlib.sha1(t.numpy().tobytes()).hexdigest())
    return tok


def _pooled(clip, enc: str, chunks: list) -> torch.Tensor:
    """EOS hidden states (n, width) of the chunks — the reference's ``pooler_output`` for SD1
    (last layer, final layer norm), and the same position in the conditioning layer otherwise.

    Cached per text-encoder module, weight patches, clip layer and token sequence (concept
    phrases and masked prompts recur across prompts and nodes); only new chunks are encoded.
    """
    tok = G.encoders_of(clip)[enc]
    base = (getattr(clip.patcher, "patches_uuid", None), clip.layer_idx, enc)
    keys = [base + tuple(_token_key(t[0]) for t in c) for c in chunks]
    try:
        cache = _POOLED_CACHE.setdefault(clip.cond_stage_model, {})
    except TypeError:  # not weak-referenceable: no caching
        cache = {}
    found = {i: cache[k] for i, k in enumerate(keys) if k in cache}
    todo = [i for i in range(len(chunks)) if i not in found]
    if todo:
        h = _encode_chunks(clip, enc, [chunks[i] for i in todo])
        idx = torch.tensor([_eos_index(chunks[i], tok) for i in todo])
        vecs = h[torch.arange(len(todo)), idx]
        for j, i in enumerate(todo):
            found[i] = cache[keys[i]] = vecs[j].clone()
        while len(cache) > _POOLED_CACHE_SIZE:
            cache.pop(next(iter(cache)))
    return torch.stack([found[i] for i in range(len(chunks))])


def concept_vectors(clip, concepts: list[str], embeddings: list[dict]) -> dict[str, torch.Tensor]:
    """Per encoder: pooled outputs of each concept phrase (encoded separately) and of each
    implicit negative embedding (its vectors alone, between start and end token)."""
    encs = G.encoders_of(clip)
    widths = G.embedding_widths(clip)
    chunks = {e: [] for e in encs}
    for phrase in concepts:
        toks = clip.tokenize(phrase)
        for e in encs:
            chunks[e].append(toks[e][0])
    for emb in embeddings:
        label = emb.get("name", "embedding")
        INV.check_embedding(emb["vectors"], widths, label)
        vec = {k: v for k, v in emb["vectors"].items() if k in widths}
        with G.embedding_in_tokenizer(clip, vec) as ref:
            toks = clip.tokenize(ref)
        for e in encs:
            if not any(isinstance(t[0], torch.Tensor) for t in toks[e][0]):
                raise ValueError(f"{label}: the embedding vectors did not reach the clip_{e} tokenizer")
            chunks[e].append(toks[e][0])
    if not chunks[next(iter(encs))]:
        raise ValueError("SAFREE needs at least one toxic concept phrase or an embedding")
    return {e: _pooled(clip, e, chunks[e]) for e in encs}


def safree_filter(clip, text: str, concepts: list[str], embeddings: list[dict] | None = None,
                  alpha: float = SF.DEFAULT_ALPHA, self_validating: bool = True, up_t: int = SF.DEFAULT_UP_T,
                  steps: int = 20):
    """CONDITIONING for ``text`` with SAFREE's selective token projection.

    Per text encoder e (SD1: clip_l; SDXL: clip_l and clip_g, each with its own subspace) and per
    77-token chunk: concept subspace C_e from the pooled concept phrases (+ embeddings), masked
    prompts (each real token replaced by id 0, as the reference) → pooled p_i, flags by the
    leave-one-out distance test, flagged tokens replaced by (I − P_C) P_I e. With the
    self-validating filter the projected conditioning covers the first ``k + 1`` of ``steps``
    steps (k = f_beta(beta, up_t); beta from the original tokens, the largest over encoders and
    chunks), as ``start_percent``/``end_percent``, and the original conditioning the rest.
    Returns (conditioning, report, info dict).
    """
    embeddings = embeddings or []
    toks = clip.tokenize(text)
    encs = G.encoders_of(clip)
    layout = _layout(clip)
    cond_list = clip.encode_from_tokens_scheduled(toks)
    cvec = concept_vectors(clip, concepts, embeddings)
    subspaces = {e: SF.toxic_subspace(cvec[e]) for e in encs}

    width = sum(w for _, _, w in layout)
    n_chunks = len(toks[layout[0][0]])
    plans = []  # (enc, offset, width, chunk index, token positions, flags, input space, eos index)
    report = []
    svf_k = -1
    flagged_total = 0
    for enc, off, w in layout:
        tok = encs[enc]
        for ci, chunk in enumerate(toks[enc]):
            eos = _eos_index(chunk, tok)
            positions = [i for i in range(1, eos) if _is_real(chunk[i][0], tok)]
            if not positions:
                continue
            masked = []
            for p in positions:
                c = list(chunk)
                c[p] = (0, 1.0)
                masked.append(c)
            masked_pooled = _pooled(clip, enc, masked)
            input_space = SF.span_subspace(masked_pooled)
            flagged = SF.flag_tokens(masked_pooled, subspaces[enc], alpha)
            plans.append((enc, off, w, ci, positions, flagged, input_space, eos))
            words = _token_words(tok, chunk, positions)
            hit = [words[i] for i in range(len(positions)) if bool(flagged[i])]
            flagged_total += len(hit)
            report.append(f"clip_{enc} chunk {ci}: {len(hit)}/{len(positions)} tokens flagged"
                          + (f": {', '.join(hit)}" if hit else ""))

    out_orig, out_filt = [], []
    betas = []
    for cond, extra in cond_list:
        if cond.shape[-1] != width or cond.shape[-2] != 77 * n_chunks:
            raise ValueError(f"unexpected conditioning shape {tuple(cond.shape)} for encoders {layout}")
        new = cond.clone()
        for enc, off, w, ci, positions, flagged, input_space, eos in plans:
            seg = cond[:, ci * 77:(ci + 1) * 77, off:off + w].float()
            proj = SF.project_tokens(seg, input_space, subspaces[enc], flagged, positions)
            new[:, ci * 77:(ci + 1) * 77, off:off + w] = proj.to(cond.dtype)
            if self_validating:
                mask = torch.zeros(77)
                mask[:eos + 1] = 1
                beta = SF.self_validating_beta(seg[:1], input_space, subspaces[enc], mask)
                betas.append(beta)
                svf_k = max(svf_k, SF.f_beta(beta, up_t=up_t))
        out_orig.append([cond, extra])
        out_filt.append([new, extra.copy()])

    info = {"flagged": flagged_total, "svf_last_step": svf_k if self_validating else None, "end_percent": 1.0}
    if flagged_total == 0:
        report.append("no token flagged: the conditioning is unchanged")
        return out_orig, "\n".join(report), info
    if not self_validating or svf_k + 1 >= steps:
        if self_validating:
            report.append(f"self-validating filter: beta max {max(betas):.4f} → filtered for steps "
                          f"0..{svf_k} (all {steps} steps)")
        else:
            report.append("self-validating filter off: filtered conditioning for every step")
        return out_filt, "\n".join(report), info
    # projected for loop indices 0..k, original after (boundary inside the gap between step k and k+1
    # for timestep-uniform schedules: normal, simple, sgm_uniform, ddim_uniform)
    end = (svf_k + 1) / steps - 1.0 / (4.0 * steps * steps)
    info["end_percent"] = end
    report.append(f"self-validating filter: beta max {max(betas):.4f} → filtered for steps 0..{svf_k} of "
                  f"{steps} (percent 0..{end:.4f}), original after")
    filt = node_helpers.conditioning_set_values(out_filt, {"start_percent": 0.0, "end_percent": end})
    orig = node_helpers.conditioning_set_values(out_orig, {"start_percent": end, "end_percent": 1.0})
    return filt + orig, "\n".join(report), info


def _token_words(tokenizer, chunk, positions) -> list[str]:
    inv = getattr(tokenizer, "_safegen_inv_vocab", None)
    if inv is None:
        try:
            inv = {v: k for k, v in tokenizer.tokenizer.get_vocab().items()}
        except Exception:  # noqa: BLE001 - names are cosmetic
            inv = {}
        try:
            tokenizer._safegen_inv_vocab = inv
        except Exception:  # noqa: BLE001
            pass
    out = []
    for p in positions:
        t = chunk[p][0]
        if isinstance(t, int):
            out.append(inv.get(t, str(t)).replace("</w>", ""))
        else:
            out.append("<embedding>")
    return out


def _concept_lines(text: str) -> list[str]:
    out = []
    for line in text.replace(";", "\n").splitlines():
        s = line.strip()
        if s:
            out.append(s)
    return out


class SAFREEPromptFilter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_SAFREEPromptFilter",
            display_name="SAFREE Prompt Filter",
            category=CATEGORY,
            description=(
                "SAFREE (training-free): encodes the prompt like CLIPTextEncode, then projects the prompt "
                "tokens that point towards the toxic-concept subspace onto its orthogonal complement. "
                "The self-validating filter keeps the projected conditioning only for the first steps "
                "(start/end percent), the original after. SD1.x (CLIP-L) and SDXL (CLIP-L and CLIP-G, "
                "each with its own subspace). Use the concept list as the negative prompt as the reference "
                "does."),
            inputs=[
                io.Clip.Input("clip", tooltip="CLIP of the model (SD1.x or SDXL)."),
                io.String.Input("text", default="", multiline=True, tooltip="The prompt."),
                io.String.Input("toxic_concepts", default="\n".join(SF.NUDITY_CONCEPTS), multiline=True,
                                tooltip="One concept phrase per line (each encoded separately; its pooled "
                                        "output spans the toxic subspace). Default: SAFREE's nudity list."),
                io.Float.Input("alpha", default=SF.DEFAULT_ALPHA, min=0.0, max=10.0, step=0.001, round=0.0001,
                               tooltip="sf_alpha: a token is flagged when masking it moves the prompt "
                                       "(1 + alpha)× farther from the subspace than the others do on "
                                       "average."),
                io.Boolean.Input("self_validating_filter", default=True,
                                 tooltip="On: projected conditioning for the first f_beta(beta, up_t)+1 "
                                         "steps "
                                         "only. Off: projected conditioning for every step."),
                io.Int.Input("up_t", default=SF.DEFAULT_UP_T, min=0, max=1000,
                             tooltip="Upper bound of the self-validating filter's step count "
                                     "(reference: 10)."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="The sampler's step count, to turn the filter's step count into "
                                     "start/end percent (exact for normal/simple/sgm_uniform/ddim_uniform "
                                     "schedulers)."),
                Embedding.Input("embedding", optional=True,
                                tooltip="Implicit negative EMBEDDING; its encoded pooled output joins the "
                                        "toxic subspace."),
                Embedding.Input("embedding_2", optional=True,
                                tooltip="A second implicit negative EMBEDDING."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING", tooltip="Filtered prompt conditioning."),
                io.String.Output(display_name="report",
                                 tooltip="Flagged tokens per encoder and the step window."),
            ],
        )

    @classmethod
    def execute(cls, clip, text, toxic_concepts, alpha, self_validating_filter, up_t, steps, embedding=None,
                embedding_2=None) -> io.NodeOutput:
        embs = [e for e in (embedding, embedding_2) if e is not None]
        concepts = _concept_lines(toxic_concepts)
        cond, report, _ = safree_filter(clip, text, concepts, embs, alpha=alpha,
                                        self_validating=self_validating_filter, up_t=up_t, steps=steps)
        return io.NodeOutput(cond, report, ui=ui.PreviewText(report))


def patch_model_reattention(model, b1: float, b2: float, s1: float, s2: float,
                            start_percent: float = 0.0, end_percent: float = 1.0):
    """Clone ``model`` with SAFREE's latent re-attention (FreeU skip/backbone re-weighting) as an
    output-block patch, active while the sigma lies in [start_percent, end_percent]."""
    m = model.clone()
    model_channels = int(m.model.model_config.unet_config["model_channels"])
    hyp = (b1, b2, s1, s2)
    ms = m.get_model_object("model_sampling")
    sigma_hi = float(ms.percent_to_sigma(start_percent))
    sigma_lo = float(ms.percent_to_sigma(end_percent))
    cpu_fft = set()

    def output_block_patch(h, hsp, transformer_options):
        st = SF.freeu_stage_params(int(h.shape[1]), model_channels, hyp)
        if st is None:
            return h, hsp
        sig = transformer_options.get("sigmas")
        if sig is not None:
            s = _first_sigma(sig)
            if s > sigma_hi or s < sigma_lo:
                return h, hsp
        b, s_ = st
        if hsp.device in cpu_fft:
            h2, sk = SF.freeu_skip_reattention(h, hsp.cpu(), b, s_)
            return h2, sk.to(hsp.device)
        try:
            return SF.freeu_skip_reattention(h, hsp, b, s_)
        except Exception:  # noqa: BLE001 - some backends lack torch.fft
            log.warning("SafeGen SAFREE: torch.fft unsupported on %s, filtering on the CPU", hsp.device)
            cpu_fft.add(hsp.device)
            h2, sk = SF.freeu_skip_reattention(h, hsp.cpu(), b, s_)
            return h2, sk.to(hsp.device)

    output_block_patch.safegen_reattention = {"model_channels": model_channels, "hyp": hyp,
                                              "sigma_range": (sigma_lo, sigma_hi)}
    m.set_model_output_block_patch(output_block_patch)
    return m


class SAFREEReattention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        b1, b2, s1, s2 = SF.DEFAULT_FREEU_HYP
        return io.Schema(
            node_id="SafeGen_SAFREEReattention",
            display_name="SAFREE Latent Re-Attention",
            category=CATEGORY,
            description=(
                "SAFREE's latent re-attention: a FreeU-style decoder patch that scales the backbone features "
                "(b) and attenuates the low frequencies of the skip features (s) at the decoder stages with "
                "4× and 2× the model's base channels (SD1.x/SDXL: 1280 and 640). Reference defaults "
                "freeu_hyp 1.0-1.0-0.9-0.2, applied for the whole run."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (SD1.x or SDXL)."),
                io.Float.Input("b1", default=b1, min=0.0, max=10.0, step=0.01,
                               tooltip="Backbone factor at the 4×-channel stage (first half of channels)."),
                io.Float.Input("b2", default=b2, min=0.0, max=10.0, step=0.01,
                               tooltip="Backbone factor at the 2×-channel stage."),
                io.Float.Input("s1", default=s1, min=0.0, max=10.0, step=0.01,
                               tooltip="Low-frequency scale of the skip features at the 4×-channel stage."),
                io.Float.Input("s2", default=s2, min=0.0, max=10.0, step=0.01,
                               tooltip="Low-frequency scale of the skip features at the 2×-channel stage."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Apply from this fraction of the denoising on (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Apply until this fraction of the denoising (1 = last step)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with latent re-attention.")],
        )

    @classmethod
    def execute(cls, model, b1, b2, s1, s2, start_percent, end_percent) -> io.NodeOutput:
        return io.NodeOutput(patch_model_reattention(model, b1, b2, s1, s2, start_percent, end_percent))


NODES = [SLDGuidance, SLDGuider, SAFREEPromptFilter, SAFREEReattention]
