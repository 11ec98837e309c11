"""SAFREE on ComfyUI objects: the prompt filter (selective token projection; on SD1.x the
self-validating filter's step window, resolved on the sampler's own sigmas) and the latent
re-attention (SAFREE's SafeGuard low-frequency filter of the filtered prompt's skip features against
the original prompt's, which are predicted in the same batch). The math is ``safegen_core.safree``'s;
ComfyUI internals go through :mod:`.compat`. Where and why this differs from jaehong31/SAFREE:
docs/safree.md.
"""
from __future__ import annotations

import logging
import math
import weakref

import torch

from ..safegen_core import safree as safree_core
from ..safegen_core.weights_io import content_hash
from . import batched_cond, compat, text
from .inversion import checked_vectors

log = logging.getLogger("safegen")

DEFAULT_ALPHA = safree_core.DEFAULT_ALPHA
DEFAULT_UP_T = safree_core.DEFAULT_UP_T
DEFAULT_FREEU_HYP = safree_core.DEFAULT_FREEU_HYP
NUDITY_CONCEPTS = safree_core.NUDITY_CONCEPTS
REFERENCE_STEPS = 50  # SAFREE's num_inference_steps (configs/sd_config.json); up_t counts its steps
WINDOW_KEY = "safegen_safree_window"  # cond key: (role, share of the run) of the self-validating filter
HOOK_KEY = "safegen_safree_window"
ORIGINAL_COND_KEY = "safegen_safree_original"
REATTENTION_MODES = ("off", "safeguard-low")


def _first_sigma(sigma) -> float:
    return float(torch.as_tensor(sigma).reshape(-1)[0])


ENCODER_ORDER = ("l", "g")  # SDXL conditioning is cat([clip_l, clip_g], -1); SD1 is clip_l only


def _layout(clip) -> list[tuple[str, int, int]]:
    """[(encoder, offset, width)] of the conditioning's feature axis."""
    widths = text.embedding_widths(clip)
    out, off = [], 0
    for enc in ENCODER_ORDER:
        if enc in widths:
            out.append((enc, off, widths[enc]))
            off += widths[enc]
    return out


def _is_real(tok, tokenizer) -> bool:
    start, end, _ = compat.special_tokens(tokenizer)
    return not (isinstance(tok, int) and tok in (start, end))


def _eos_index(chunk, tokenizer) -> int:
    """Position of the first end token of a 77-token chunk (the pooled position)."""
    end = compat.special_tokens(tokenizer)[1]
    for i, t in enumerate(chunk):
        if i > 0 and isinstance(t[0], int) and t[0] == end:
            return i
    return len(chunk) - 1


_POOLED_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_POOLED_CACHE_SIZE = 1024  # vectors per text-encoder module (a few MB)


def _token_key(tok) -> object:
    if isinstance(tok, torch.Tensor):
        return ("emb", content_hash(tok))
    return tok


def _pooled(clip, enc: str, chunks: list, projected: bool = False) -> torch.Tensor:
    """One vector per 77-token chunk: ``projected=False`` — the EOS hidden state of the conditioning
    layer (the reference's SD1 ``pooler_output``: last layer, final layer norm); ``projected=True`` —
    the encoder's projected pooled output (SDXL CLIP-G ``text_embeds``, the reference's SDXL choice).

    Cached per text-encoder module, weight patches, clip layer and token sequence (concept phrases
    and masked prompts recur across prompts and nodes); only new chunks are encoded.
    """
    tok = text.encoders(clip)[enc]
    base = (compat.clip_patches_version(clip), clip.layer_idx, enc, projected)
    keys = [base + tuple(_token_key(t[0]) for t in c) for c in chunks]
    try:
        cache = _POOLED_CACHE.setdefault(compat.clip_model(clip), {})
    except TypeError:  # not weak-referenceable: no caching
        cache = {}
    found = {i: cache[k] for i, k in enumerate(keys) if k in cache}
    todo = [i for i in range(len(chunks)) if i not in found]
    if todo:
        if projected:
            vecs = compat.pooled_token_chunks(clip, enc, [chunks[i] for i in todo])
        else:
            h = compat.encode_token_chunks(clip, enc, [chunks[i] for i in todo])
            idx = torch.tensor([_eos_index(chunks[i], tok) for i in todo])
            vecs = h[torch.arange(len(todo)), idx]
        for j, i in enumerate(todo):
            found[i] = cache[keys[i]] = vecs[j].float().clone()
        while len(cache) > _POOLED_CACHE_SIZE:
            cache.pop(next(iter(cache)))
    return torch.stack([found[i] for i in range(len(chunks))])


def _plan(clip):
    """[(encoder, column offset, width, projected pooled?)] that SAFREE projects. SD1.x: CLIP-L, EOS
    states. SDXL: only CLIP-G (columns 768:) with its projected pooled vectors, as the reference
    ([xl] 1460-1487); CLIP-L columns stay as encoded."""
    layout = _layout(clip)
    if [e for e, _, _ in layout] == ["l"]:
        return [("l", 0, layout[0][2], False)]
    return [(e, off, w, True) for e, off, w in layout if e == "g"]


def concept_vectors(clip, concepts: list[str], embeddings: list[dict], enc: str, projected: bool) -> torch.Tensor:
    """Pooled vectors of each concept phrase (encoded separately) and of each implicit negative
    embedding (its vectors alone, between start and end token) for encoder ``enc``."""
    chunks = []
    for phrase in concepts:
        chunks.append(clip.tokenize(phrase)[enc][0])
    for emb in embeddings:
        toks = text.tokens_with_vectors(clip, text.prompt_with_embedding("{}"), checked_vectors(clip, emb))
        chunks.append(toks[enc][0])
    if not chunks:
        raise ValueError("SAFREE needs at least one toxic concept phrase or an embedding")
    return _pooled(clip, enc, chunks, projected)


def safree_filter(clip, prompt: str, concepts: list[str], embeddings: list[dict] | None = None,
                  alpha: float = safree_core.DEFAULT_ALPHA, self_validating: bool = True,
                  up_t: int = safree_core.DEFAULT_UP_T):
    """CONDITIONING for ``prompt`` with SAFREE's selective token projection.

    Per projected encoder (SD1.x: CLIP-L; SDXL: CLIP-G only) and 77-token chunk: concept subspace C
    from the pooled concept phrases (+ embeddings), masked prompts (each real token replaced by id 0,
    as the reference) → pooled p_i, flags by the leave-one-out distance test, flagged tokens replaced
    by (I − P_C) P_I e. SD1.x with the self-validating filter: the projected conditioning for the first
    k + 1 of SAFREE's 50 steps (k = f_beta(beta, up_t)), i.e. that share of the sampler's own steps —
    resolved on its sigmas when sampling (:func:`resolve_windows`) — and the original after. SDXL:
    every step, as the reference (its pipeline has no self-validating filter).
    Returns (conditioning, report, info dict).
    """
    embeddings = embeddings or []
    toks = clip.tokenize(prompt)
    encs = text.encoders(clip)
    layout = _layout(clip)
    plan = _plan(clip)
    sdxl = plan[0][0] == "g"
    cond_list = clip.encode_from_tokens_scheduled(toks)
    subspaces = {e: safree_core.toxic_subspace(concept_vectors(clip, concepts, embeddings, e, proj))
                 for e, _, _, proj in plan}

    width = sum(w for _, _, w in layout)
    n_chunks = len(toks[layout[0][0]])
    chunk_plans = []  # (enc, offset, width, chunk index, token positions, flags, input space, eos index)
    report = []
    flagged_total = 0
    for enc, off, w, proj in plan:
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
            masked_pooled = _pooled(clip, enc, masked, proj)
            input_space = safree_core.span_subspace(masked_pooled)
            flagged = safree_core.flag_tokens(masked_pooled, subspaces[enc], alpha)
            chunk_plans.append((enc, off, w, ci, positions, flagged, input_space, eos))
            words = _token_words(tok, chunk, positions)
            hit = [words[i] for i in range(len(positions)) if bool(flagged[i])]
            flagged_total += len(hit)
            report.append(f"clip_{enc} chunk {ci}: {len(hit)}/{len(positions)} tokens flagged"
                          + (f": {', '.join(hit)}" if hit else ""))
    if sdxl:
        report.append("SDXL: CLIP-G columns projected (subspaces from projected pooled outputs); CLIP-L columns "
                      "and the pooled vector as encoded — as the reference")

    out_orig, out_filt = [], []
    betas = []
    svf_k = -1
    use_svf = self_validating and not sdxl
    for cond, extra in cond_list:
        if cond.shape[-1] != width or cond.shape[-2] != 77 * n_chunks:
            raise ValueError(f"unexpected conditioning shape {tuple(cond.shape)} for encoders {layout}")
        new = cond.clone()
        for enc, off, w, ci, positions, flagged, input_space, eos in chunk_plans:
            seg = cond[:, ci * 77:(ci + 1) * 77, off:off + w].float()
            proj = safree_core.project_tokens(seg, input_space, subspaces[enc], flagged, positions)
            new[:, ci * 77:(ci + 1) * 77, off:off + w] = proj.to(cond.dtype)
            if use_svf:
                mask = torch.zeros(77)
                mask[:eos + 1] = 1
                beta = safree_core.self_validating_beta(seg[:1], input_space, subspaces[enc], mask)
                betas.append(beta)
                svf_k = max(svf_k, safree_core.f_beta(beta, up_t=up_t))
        out_orig.append([cond, extra])
        out_filt.append([new, extra.copy()])

    info = {"flagged": flagged_total, "svf_last_step": svf_k if use_svf else None, "share": 1.0, "sdxl": sdxl}
    if flagged_total == 0:
        report.append("no token flagged: the conditioning is unchanged")
        return out_orig, "\n".join(report), info
    if sdxl and self_validating:
        report.append("self-validating filter: not part of SAFREE's SDXL pipeline; filtered conditioning for "
                      "every step")
    if not use_svf:
        if not sdxl:
            report.append("self-validating filter off: filtered conditioning for every step")
        return out_filt, "\n".join(report), info
    share = (svf_k + 1) / REFERENCE_STEPS
    info["share"] = share
    if svf_k + 1 >= REFERENCE_STEPS:
        report.append(f"self-validating filter: beta max {max(betas):.4f} → filtered for every step")
        return out_filt, "\n".join(report), info
    report.append(f"self-validating filter: beta max {max(betas):.4f} → filtered for SAFREE's steps 0..{svf_k} "
                  f"of {REFERENCE_STEPS} = the first {share:.0%} of the sampler's steps (e.g. "
                  f"{window_steps(share, 20)} of 20), original after")
    return window_conditioning(out_filt, out_orig, share), "\n".join(report), info


def window_steps(share: float, n_steps: int) -> int:
    """Steps that use the filtered conditioning in a run of ``n_steps``: the reference's share of its
    50 steps, rounded half up, at least 1 (SAFREE always filters loop index 0)."""
    return min(n_steps, max(1, int(math.floor(share * n_steps + 0.5))))


def window_conditioning(filtered: list, original: list, share: float) -> list:
    """Both conditionings, each marked with its part of the run. Until the sampler resolves the window
    on its own sigmas (:func:`resolve_windows`, via a hook these conds carry), start/end percent hold
    the same share of the timesteps — the same steps for timestep-uniform schedulers."""
    hooks = compat.outer_sample_hook(HOOK_KEY, resolve_windows)
    end = share
    filt = compat.conditioning_set_values(filtered, {"start_percent": 0.0, "end_percent": end,
                                                     WINDOW_KEY: ("filtered", share), "hooks": hooks})
    orig = compat.conditioning_set_values(original, {"start_percent": end, "end_percent": 1.0,
                                                     WINDOW_KEY: ("original", share), "hooks": hooks})
    return filt + orig


def resolve_windows(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper (installed by the conds' hook): the self-validating windows on this run's
    sigmas. The filtered cond is used for the first :func:`window_steps` steps — its sigma range ends
    between step m−1 and step m of the schedule — and the original one after; exact for any scheduler
    and step count (also Heun's and DPM2's extra evaluations fall on the side of their sigma). The
    hook is then dropped from the run's conds so they batch with the others."""
    guider = compat.guider_of(executor)
    conds = compat.guider_conds(guider) or {}
    sigmas = compat.outer_sample_sigmas(args, kwargs)
    n = int(sigmas.shape[-1]) - 1
    for lst in conds.values():
        if not isinstance(lst, list):
            continue
        for c in lst:
            mark = c.pop(WINDOW_KEY, None) if isinstance(c, dict) else None
            if mark is None:
                continue
            role, share = mark
            m = window_steps(share, n)
            hi, lo = float(sigmas[m - 1]), float(sigmas[m]) if m <= n else 0.0
            boundary = math.sqrt(hi * lo) if lo > 0 else hi / 2
            c.pop("start_percent", None)
            c.pop("end_percent", None)
            c.pop("hooks", None)
            if role == "filtered":
                c["timestep_end"] = boundary if m < n else 0.0  # used while sigma >= boundary
            else:
                c["timestep_start"] = boundary if m < n else -1.0  # used while sigma <= boundary
    return executor(*args, **kwargs)


def _token_words(tokenizer, chunk, positions) -> list[str]:
    inv = _INV_VOCAB.get(id(tokenizer))
    if inv is None:
        try:
            inv = {v: k for k, v in compat.vocab(tokenizer).items()}
        except Exception:  # noqa: BLE001 - names are cosmetic
            inv = {}
        _INV_VOCAB[id(tokenizer)] = inv
    out = []
    for p in positions:
        t = chunk[p][0]
        if isinstance(t, int):
            out.append(inv.get(t, str(t)).replace("</w>", ""))
        else:
            out.append("<embedding>")
    return out


def concept_lines(concepts: str) -> list[str]:
    out = []
    for line in concepts.replace(";", "\n").splitlines():
        s = line.strip()
        if s:
            out.append(s)
    return out


class Reattention:
    """State of one re-attention patch: which rows of the current UNet batch are the filtered prompt's
    and which the original prompt's (``transformer_options["cond_or_uncond"]``: 0 = positive, the
    original prompt's ExtraCond label otherwise)."""

    def __init__(self, extra: batched_cond.ExtraCond, hyp, model_channels: int, sigma_range):
        self.extra, self.hyp, self.model_channels = extra, hyp, model_channels
        self.sigma_lo, self.sigma_hi = sigma_range
        self.applied = 0
        self._warned = False

    def pairs(self, batch: int, labels: list) -> list[tuple[int, int]]:
        label = self.extra.label
        if label is None or not labels or batch % len(labels):
            return []
        n = batch // len(labels)
        filt = [i for i, c in enumerate(labels) if c == 0]
        orig = [i for i, c in enumerate(labels) if c == label]
        if len(filt) != len(orig):
            if not self._warned:
                log.warning("SafeGen SAFREE re-attention: %d positive and %d original-prompt chunks in one UNet "
                            "call; not filtering", len(filt), len(orig))
                self._warned = True
            return []
        return [(f * n + j, o * n + j) for f, o in zip(filt, orig) for j in range(n)]

    def output_block_patch(self, h, hsp, transformer_options):
        st = safree_core.reattention_stage(int(h.shape[1]), self.model_channels, self.hyp)
        if st is None:
            return h, hsp
        sig = transformer_options.get("sigmas")
        if sig is not None:
            s = _first_sigma(sig)
            if s > self.sigma_hi or s < self.sigma_lo:
                return h, hsp
        pairs = self.pairs(int(h.shape[0]), list(transformer_options.get("cond_or_uncond") or []))
        if pairs:
            self.applied += 1
        b, s_ = st
        return safree_core.safeguard_reattention(h, hsp, b, s_, pairs)


def patch_model_reattention(model, mode: str = "off", original=None, b1: float = 1.0, b2: float = 1.0,
                            s1: float = 0.9, s2: float = 0.2, start_percent: float = 0.0, end_percent: float = 1.0):
    """SAFREE's latent re-attention ([flu] ``SafeGuard_Low_Fourier_filter``): ``mode="off"`` (default, as
    the published runs, whose patch does nothing) returns ``model`` itself; ``"safeguard-low"`` clones
    it, predicts ``original`` (the unfiltered prompt's CONDITIONING) in the same batch as the sampler's
    positive/negative, and at the decoder stages with 4×/2× base channels replaces the window
    coefficients of the filtered prompt's skip features (s1/s2) where the original's are not larger,
    and scales the first half of the backbone channels of every row (b1/b2), while the sigma lies in
    [start_percent, end_percent]."""
    if mode not in REATTENTION_MODES:
        raise ValueError(f"unknown re-attention mode {mode!r}; one of {', '.join(REATTENTION_MODES)}")
    if mode == "off":
        return model
    if original is None:
        raise ValueError("SAFREE re-attention 'safeguard-low' needs the original prompt's CONDITIONING "
                         "(the SAFREE Prompt Filter's original output)")
    m = model.clone()
    model_channels = int(compat.unet_config(m)["model_channels"])
    ms = m.get_model_object("model_sampling")
    sigma_range = (float(ms.percent_to_sigma(end_percent)), float(ms.percent_to_sigma(start_percent)))
    extra = batched_cond.ExtraCond(ORIGINAL_COND_KEY, original, prompt_type="positive", control_from="positive")
    state = Reattention(extra, (b1, b2, s1, s2), model_channels, sigma_range)
    extra.install(m, consume=lambda args, pred: None)
    patch = state.output_block_patch
    m.set_model_output_block_patch(patch)
    m.model_options["safegen_safree_reattention"] = state
    return m


_INV_VOCAB: dict[int, dict] = {}


def prompt_filter(clip, prompt: str, toxic_concepts: str, alpha: float, self_validating: bool, up_t: int,
                  embeddings: list):
    """The SAFREE Prompt Filter node: (CONDITIONING, original CONDITIONING, report)."""
    cond, report, _ = safree_filter(clip, prompt, concept_lines(toxic_concepts), embeddings, alpha=alpha,
                                    self_validating=self_validating, up_t=up_t)
    return cond, clip.encode_from_tokens_scheduled(clip.tokenize(prompt)), report
