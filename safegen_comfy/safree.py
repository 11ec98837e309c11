"""SAFREE on ComfyUI objects: the prompt filter (selective token projection + self-validating step
window via ``start_percent``/``end_percent``) and latent re-attention (a FreeU-style output-block
patch). The math is ``safegen_core.safree``'s; CLIP internals go through :mod:`.compat`.
"""
from __future__ import annotations

import logging
import weakref

import torch

from ..safegen_core import safree as safree_core
from ..safegen_core.weights_io import content_hash
from . import compat, text
from .inversion import checked_vectors

log = logging.getLogger("safegen")

DEFAULT_ALPHA = safree_core.DEFAULT_ALPHA
DEFAULT_UP_T = safree_core.DEFAULT_UP_T
DEFAULT_FREEU_HYP = safree_core.DEFAULT_FREEU_HYP
NUDITY_CONCEPTS = safree_core.NUDITY_CONCEPTS


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


def _pooled(clip, enc: str, chunks: list) -> torch.Tensor:
    """EOS hidden states (n, width) of the chunks — the reference's ``pooler_output`` for SD1
    (last layer, final layer norm), and the same position in the conditioning layer otherwise.

    Cached per text-encoder module, weight patches, clip layer and token sequence (concept
    phrases and masked prompts recur across prompts and nodes); only new chunks are encoded.
    """
    tok = text.encoders(clip)[enc]
    base = (compat.clip_patches_version(clip), clip.layer_idx, enc)
    keys = [base + tuple(_token_key(t[0]) for t in c) for c in chunks]
    try:
        cache = _POOLED_CACHE.setdefault(compat.clip_model(clip), {})
    except TypeError:  # not weak-referenceable: no caching
        cache = {}
    found = {i: cache[k] for i, k in enumerate(keys) if k in cache}
    todo = [i for i in range(len(chunks)) if i not in found]
    if todo:
        h = compat.encode_token_chunks(clip, enc, [chunks[i] for i in todo])
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
    encs = text.encoders(clip)
    chunks = {e: [] for e in encs}
    for phrase in concepts:
        toks = clip.tokenize(phrase)
        for e in encs:
            chunks[e].append(toks[e][0])
    for emb in embeddings:
        toks = text.tokens_with_vectors(clip, text.prompt_with_embedding("{}"), checked_vectors(clip, emb))
        for e in encs:
            chunks[e].append(toks[e][0])
    if not chunks[next(iter(encs))]:
        raise ValueError("SAFREE needs at least one toxic concept phrase or an embedding")
    return {e: _pooled(clip, e, chunks[e]) for e in encs}


def safree_filter(clip, prompt: str, concepts: list[str], embeddings: list[dict] | None = None,
                  alpha: float = safree_core.DEFAULT_ALPHA, self_validating: bool = True, up_t: int = safree_core.DEFAULT_UP_T,
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
    toks = clip.tokenize(prompt)
    encs = text.encoders(clip)
    layout = _layout(clip)
    cond_list = clip.encode_from_tokens_scheduled(toks)
    cvec = concept_vectors(clip, concepts, embeddings)
    subspaces = {e: safree_core.toxic_subspace(cvec[e]) for e in encs}

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
            input_space = safree_core.span_subspace(masked_pooled)
            flagged = safree_core.flag_tokens(masked_pooled, subspaces[enc], alpha)
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
            proj = safree_core.project_tokens(seg, input_space, subspaces[enc], flagged, positions)
            new[:, ci * 77:(ci + 1) * 77, off:off + w] = proj.to(cond.dtype)
            if self_validating:
                mask = torch.zeros(77)
                mask[:eos + 1] = 1
                beta = safree_core.self_validating_beta(seg[:1], input_space, subspaces[enc], mask)
                betas.append(beta)
                svf_k = max(svf_k, safree_core.f_beta(beta, up_t=up_t))
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
    filt = compat.conditioning_set_values(out_filt, {"start_percent": 0.0, "end_percent": end})
    orig = compat.conditioning_set_values(out_orig, {"start_percent": end, "end_percent": 1.0})
    return filt + orig, "\n".join(report), info


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


def patch_model_reattention(model, b1: float, b2: float, s1: float, s2: float,
                            start_percent: float = 0.0, end_percent: float = 1.0):
    """Clone ``model`` with SAFREE's latent re-attention (FreeU skip/backbone re-weighting) as an
    output-block patch, active while the sigma lies in [start_percent, end_percent]."""
    m = model.clone()
    model_channels = int(compat.unet_config(m)["model_channels"])
    hyp = (b1, b2, s1, s2)
    ms = m.get_model_object("model_sampling")
    sigma_hi = float(ms.percent_to_sigma(start_percent))
    sigma_lo = float(ms.percent_to_sigma(end_percent))
    cpu_fft = set()

    def output_block_patch(h, hsp, transformer_options):
        st = safree_core.freeu_stage_params(int(h.shape[1]), model_channels, hyp)
        if st is None:
            return h, hsp
        sig = transformer_options.get("sigmas")
        if sig is not None:
            s = _first_sigma(sig)
            if s > sigma_hi or s < sigma_lo:
                return h, hsp
        b, s_ = st
        if hsp.device in cpu_fft:
            h2, sk = safree_core.freeu_skip_reattention(h, hsp.cpu(), b, s_)
            return h2, sk.to(hsp.device)
        try:
            return safree_core.freeu_skip_reattention(h, hsp, b, s_)
        except Exception:  # noqa: BLE001 - some backends lack torch.fft
            log.warning("SafeGen SAFREE: torch.fft unsupported on %s, filtering on the CPU", hsp.device)
            cpu_fft.add(hsp.device)
            h2, sk = safree_core.freeu_skip_reattention(h, hsp.cpu(), b, s_)
            return h2, sk.to(hsp.device)

    output_block_patch.safegen_reattention = {"model_channels": model_channels, "hyp": hyp,
                                              "sigma_range": (sigma_lo, sigma_hi)}
    m.set_model_output_block_patch(output_block_patch)
    return m



_INV_VOCAB: dict[int, dict] = {}


def prompt_filter(clip, prompt: str, toxic_concepts: str, alpha: float, self_validating: bool, up_t: int,
                  steps: int, embeddings: list):
    """The SAFREE Prompt Filter node: (CONDITIONING, report)."""
    cond, report, _ = safree_filter(clip, prompt, concept_lines(toxic_concepts), embeddings, alpha=alpha,
                                    self_validating=self_validating, up_t=up_t, steps=steps)
    return cond, report
