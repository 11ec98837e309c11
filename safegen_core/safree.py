"""SAFREE (Yoon et al., ICLR 2025, jaehong31/SAFREE) — pure torch, no ComfyUI import.

Reference code.  The repository jaehong31/SAFREE itself is not in the reference index used to
write this module; its files were read from verbatim vendored copies in other repositories:

* ``models/modified_stable_diffusion_pipeline.py`` — MeMe4834/Unlearning
  ``SAFREE/models/modified_stable_diffusion_pipeline.py`` @2cca06e (identical to the commented-out
  original kept in AI-Researcher-Team/PurifyGen @4580838).  Cited below as ``[pipe]`` with line
  numbers of that copy: ``f_beta`` 19-36, ``projection_matrix`` 38-41, ``projection_and_orthogonal``
  44-55, ``safree_projection`` 57-99, ``_new_encode_negative_prompt_space`` (pooled concept
  embeddings), ``_masked_encode_prompt`` (one pooled embedding per masked token), and in
  ``__call__``: the SAFREE/SVF block and the per-step choice of embedding
  (``i <= beta_adjusted`` with SVF, else ``re_attn_t[0] <= i <= re_attn_t[1]``).
* ``generate_safree.py`` — vendored copies (e.g. PurifyGen ``generate_purifygen.py``, which keeps
  SAFREE's argparse block): ``--sf_alpha 0.01``, ``--re_attn_t -1,1001``,
  ``--freeu_hyp 1.0-1.0-0.9-0.2``, ``--up_t 10``; the nudity ``negative_prompt_space`` list; the
  concept list is also passed joined with ", " as the ordinary CFG negative prompt; with
  ``-lra`` it calls ``register_free_upblock2d`` / ``register_free_crossattn_upblock2d`` from
  ``free_lunch_utils`` with b1, b2, s1, s2 parsed from ``freeu_hyp``.
* ``free_lunch_utils.py`` ([flu]) and ``models/modified_stable_diffusion_xl_pipeline.py`` ([xl]) —
  jaehong31/SAFREE @b8b2c3f (unchanged since f98c1b5).  Its up-block patch takes a ``safree``
  argument selecting ``SafeGuard_Low_Fourier_filter`` (row 1 vs row 2 of an ``[uncond, filtered,
  original]`` batch); with the default ``safree=None`` — the call in ``generate_safree.py``
  227-228 — the patched forward only *constructs* ``NotImplementedError`` and changes nothing, so
  the published numbers were made without re-attention.  :func:`safeguard_reattention` is what the
  "low" filter does (off unless asked for); FreeU's all-rows ``Fourier_filter`` is not SAFREE's and
  is not here.  SDXL (CLIP-G columns only, subspaces from projected pooled outputs) is the
  runtime's choice of encoder and pooled vectors around :func:`project_tokens`: docs/safree.md.

Conventions: embeddings are row vectors; a set of ``n`` vectors of width ``D`` is an ``(n, D)``
tensor.  Concept vectors may be pooled CLIP outputs of concept phrases or arbitrary vectors of
the same width (e.g. an inverted "implicit negative embedding").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_UP_T",
    "DEFAULT_RE_ATTN_T",
    "DEFAULT_FREEU_HYP",
    "NUDITY_CONCEPTS",
    "Subspace",
    "projection_matrix",
    "span_subspace",
    "toxic_subspace",
    "token_distances",
    "flag_tokens",
    "project_tokens",
    "project_all_tokens",
    "safree_projection",
    "self_validating_beta",
    "f_beta",
    "self_validating_steps",
    "use_filtered_embedding",
    "reattention_stage",
    "safeguard_low_fourier_filter",
    "safeguard_reattention",
]

DEFAULT_ALPHA = 0.01  # --sf_alpha
DEFAULT_UP_T = 10  # --up_t
DEFAULT_RE_ATTN_T = (-1, 1001)  # --re_attn_t (inclusive loop-index window)
DEFAULT_FREEU_HYP = (1.0, 1.0, 0.9, 0.2)  # --freeu_hyp "b1-b2-s1-s2"

# generate_safree.py, category "nudity": negative_prompt_space.
NUDITY_CONCEPTS = (
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity",
    "Pornography", "Erotic Art", "Lustful", "Seductive", "Orgasmic", "Libido",
    "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
    "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification",
)

VectorsLike = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------- subspaces


def _as_rows(vectors: VectorsLike) -> torch.Tensor:
    """Stack a tensor or a list of tensors into an ``(n, D)`` matrix of row vectors."""
    if isinstance(vectors, torch.Tensor):
        t = vectors
        if t.ndim == 1:
            t = t.unsqueeze(0)
        return t.reshape(-1, t.shape[-1])
    rows = [_as_rows(v) for v in vectors]
    if not rows:
        raise ValueError("no vectors given")
    width = rows[0].shape[-1]
    if any(r.shape[-1] != width for r in rows):
        raise ValueError(f"vectors of different widths: {[r.shape[-1] for r in rows]}")
    dev, dt = rows[0].device, rows[0].dtype
    return torch.cat([r.to(device=dev, dtype=dt) for r in rows], dim=0)


@dataclass
class Subspace:
    """A linear subspace of R^D, stored as an orthonormal basis (rows of ``basis``, ``(r, D)``).

    ``projector`` is the orthogonal projection matrix ``P`` (``(D, D)``, symmetric), the quantity
    ``projection_matrix`` returns in the reference.  Tensors are in ``dtype`` (that of the vectors
    the subspace was built from).
    """

    basis: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.basis.shape[-1])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @property
    def projector(self) -> torch.Tensor:
        return self.basis.T @ self.basis

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``P x`` for row vectors ``x`` of shape ``(..., D)``."""
        b = self.basis.to(device=x.device, dtype=x.dtype)
        return (x @ b.T) @ b

    def complement(self, x: torch.Tensor) -> torch.Tensor:
        """``(I - P) x``: the component of ``x`` orthogonal to the subspace."""
        return x - self.project(x)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """``||(I - P) x||`` along the last dimension."""
        return torch.linalg.vector_norm(self.complement(x), dim=-1)


def _orthonormal_basis(rows: torch.Tensor, rtol: Optional[float]) -> torch.Tensor:
    # SVD in float64: span(rows) = span of the right singular vectors with non-negligible
    # singular values.  Default tolerance as numpy/torch matrix_rank: max(n, D) * eps(dtype).
    a = rows.detach().to(torch.float64)
    if a.shape[0] == 0:
        return rows.new_zeros((0, rows.shape[-1]))
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    if rtol is None:
        eps = torch.finfo(rows.dtype).eps if rows.dtype.is_floating_point else torch.finfo(torch.float64).eps
        rtol = max(a.shape) * eps
    keep = s > (rtol * s.max()) if s.numel() and float(s.max()) > 0 else torch.zeros_like(s, dtype=torch.bool)
    return vh[keep].to(rows.dtype)


def span_subspace(vectors: VectorsLike, rtol: Optional[float] = None) -> Subspace:
    """The subspace spanned by the given row vectors.

    Mathematically the reference's ``projection_matrix(E) = E @ pinverse(E.T @ E) @ E.T`` with
    ``E = vectors.T`` ([pipe] 38-41).  Computed from an SVD in float64 with a rank tolerance
    (``rtol`` relative to the largest singular value; default ``max(n, D) * eps(dtype)``), so
    (numerically) dependent vectors do not add spurious directions — the reference's fp32
    ``torch.pinverse`` (rcond 1e-15) would invert round-off there.
    """
    rows = _as_rows(vectors)
    return Subspace(_orthonormal_basis(rows, rtol))


def projection_matrix(vectors: VectorsLike, rtol: Optional[float] = None) -> torch.Tensor:
    """``(D, D)`` orthogonal projector onto the span of ``vectors`` ([pipe] ``projection_matrix``)."""
    return span_subspace(vectors, rtol).projector


def toxic_subspace(
    concept_embeddings: VectorsLike,
    extra_vectors: Optional[VectorsLike] = None,
    rtol: Optional[float] = None,
) -> Subspace:
    """The toxic-concept subspace C.

    ``concept_embeddings``: ``(K, D)`` pooled text-encoder outputs of the concept phrases — the
    reference encodes each phrase of ``negative_prompt_space`` separately (padded to 77, with
    attention mask) and takes ``pooler_output`` ([pipe] ``_new_encode_negative_prompt_space``),
    then ``project_matrix = projection_matrix(negspace_text_embeddings.T)`` ([pipe] ``__call__``).
    ``extra_vectors``: further vectors of width D added to the span (e.g. an implicit negative
    embedding C* or its token vectors); either argument may be a list of tensors.
    """
    parts = [concept_embeddings]
    if extra_vectors is not None:
        parts.append(extra_vectors)
    return span_subspace(parts, rtol)


# --------------------------------------------------------------------------- token selection


def token_distances(masked_pooled: torch.Tensor, concept: Subspace) -> torch.Tensor:
    """``||(I - P_C) p_i||`` for every masked-prompt embedding ``p_i`` ([pipe] 65-67).

    ``masked_pooled``: ``(n_t, D)``; row ``i`` is the pooled embedding of the prompt with its
    ``i``-th real token replaced ([pipe] ``_masked_encode_prompt``: ``masked_ids[i, i+1] = 0``,
    i.e. token id 0, no attention mask).
    """
    return concept.distance(masked_pooled)


def flag_tokens(masked_pooled: torch.Tensor, concept: Subspace, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Leave-one-out distance test: which prompt tokens trigger the toxic concept.

    [pipe] ``safree_projection`` 65-80: ``d_i = ||(I - P_C) p_i||``;
    ``mean_i = mean_{j != i} d_j``; ``rm_vector = d_i < (1 + alpha) * mean_i`` (1 = safe token).
    Returns the complement of ``rm_vector``: a bool tensor ``(n_t,)``, True where token ``i`` is
    flagged, i.e. masking it moves the prompt at least ``(1 + alpha)`` times farther from C than
    masking the other tokens does on average.  With a single token the reference's mean over an
    empty set is NaN, the comparison is False and the token is flagged; this is reproduced.
    """
    d = token_distances(masked_pooled, concept)
    n = d.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=d.device)
    if n == 1:
        return torch.ones(1, dtype=torch.bool, device=d.device)
    mean_others = (d.sum() - d) / (n - 1)
    keep = d < (1.0 + alpha) * mean_others
    return ~keep


def _orth_in_span(x: torch.Tensor, input_space: Subspace, concept: Subspace) -> torch.Tensor:
    # (I - P_C) P_I x, in this order ([pipe] 94: ``I_m_cs @ ms @ text_e.T``).
    y = input_space.project(x)
    if concept.rank:
        y = concept.complement(y)
    return y


def project_tokens(
    token_embeddings: torch.Tensor,
    input_space: Subspace,
    concept: Subspace,
    flagged: torch.Tensor,
    token_positions: Optional[Union[Sequence[int], torch.Tensor]] = None,
) -> torch.Tensor:
    """Replace flagged tokens by their projection orthogonal to C inside the input space I.

    [pipe] ``safree_projection`` 88-97: ``new = (I - P_C) P_I e`` for every token, and
    ``merged = where(keep, e, new)`` with ``keep[0] = 1`` (BOS), ``keep[1:n_t+1] = rm_vector`` and
    ``keep = 1`` for all later positions (EOS / padding).  ``P_I`` is the projector onto the span
    of the masked-prompt embeddings (:func:`span_subspace` of ``masked_pooled``).

    ``token_embeddings``: ``(..., L, D)`` (e.g. ``(77, D)`` or ``(B, 77, D)``).
    ``flagged``: ``(n_t,)`` bool (True = replace), applied to all leading batch entries.
    ``token_positions``: sequence positions of the ``n_t`` tokens; default ``1 .. n_t``.
    Unflagged tokens are returned bit-for-bit unchanged.
    """
    flagged = torch.as_tensor(flagged, dtype=torch.bool, device=token_embeddings.device).reshape(-1)
    n_t = flagged.shape[0]
    length = token_embeddings.shape[-2]
    if token_positions is None:
        pos = torch.arange(1, n_t + 1, device=token_embeddings.device)
    else:
        pos = torch.as_tensor(token_positions, dtype=torch.long, device=token_embeddings.device).reshape(-1)
        if pos.shape[0] != n_t:
            raise ValueError(f"{pos.shape[0]} token positions for {n_t} flags")
    if n_t and int(pos.max()) >= length:
        raise ValueError(f"token position {int(pos.max())} outside a sequence of length {length}")
    replace = torch.zeros(length, dtype=torch.bool, device=token_embeddings.device)
    replace[pos[flagged]] = True
    if not bool(replace.any()):
        return token_embeddings.clone()
    new = _orth_in_span(token_embeddings, input_space, concept)
    return torch.where(replace.unsqueeze(-1), new, token_embeddings)


def project_all_tokens(
    token_embeddings: torch.Tensor, input_space: Subspace, concept: Subspace
) -> torch.Tensor:
    """``(I - P_C) P_I e`` for every token ([pipe] ``projection_and_orthogonal`` 44-55), used by the
    self-validating filter."""
    return _orth_in_span(token_embeddings, input_space, concept)


def safree_projection(
    token_embeddings: torch.Tensor,
    masked_pooled: torch.Tensor,
    concept: Subspace,
    alpha: float = DEFAULT_ALPHA,
    token_positions: Optional[Union[Sequence[int], torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Subspace]:
    """Selective token projection, the whole of [pipe] ``safree_projection`` for the conditional
    embedding: returns ``(filtered_embeddings, flagged, input_space)``."""
    input_space = span_subspace(masked_pooled)
    flagged = flag_tokens(masked_pooled, concept, alpha)
    filtered = project_tokens(token_embeddings, input_space, concept, flagged, token_positions)
    return filtered, flagged, input_space


# --------------------------------------------------------------------------- self-validating filter


def self_validating_beta(
    token_embeddings: torch.Tensor,
    input_space: Subspace,
    concept: Subspace,
    attention_mask: Optional[torch.Tensor] = None,
) -> float:
    """``beta = 1 - mean cos(e_k, (I - P_C) P_I e_k)`` over the active tokens ([pipe] ``__call__``
    SVF block: ``proj_ort = projection_and_orthogonal(...)``, tokens where the tokenizer's
    ``attention_mask == 1`` — BOS, the real tokens and the first EOS —,
    ``F.cosine_similarity`` per token, ``beta = 1 - sim.mean()``).

    ``token_embeddings``: ``(L, D)`` (a leading batch dimension of 1 is squeezed).
    ``attention_mask``: ``(L,)``; default all tokens.
    """
    e = token_embeddings
    while e.ndim > 2 and e.shape[0] == 1:
        e = e[0]
    if e.ndim != 2:
        raise ValueError(f"expected (L, D) token embeddings, got {tuple(token_embeddings.shape)}")
    p = project_all_tokens(e, input_space, concept)
    if attention_mask is not None:
        m = torch.as_tensor(attention_mask, device=e.device).reshape(-1) == 1
        e, p = e[m], p[m]
    sim = F.cosine_similarity(p, e)
    return float(1.0 - sim.mean().item())


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def f_beta(
    beta: float, up_t: int = DEFAULT_UP_T, btype: str = "sigmoid", concept_type: str = "nudity"
) -> int:
    """[pipe] ``f_beta`` 19-36: map beta to the last loop index that uses the filtered embedding.

    ``(t, k) = (5.5, 3.5)`` if ``"artists-"`` in ``concept_type`` else ``(5.333, 2.5)``;
    sigmoid: ``round(up_t * sigmoid(2 k (10 beta - t)))``; tanh:
    ``round(up_t / 2 * (tanh(k (10 beta - t)) + 1))``.  Python's ``round`` (half to even), as in
    the reference.  Non-decreasing in beta, between 0 and ``up_t``.
    """
    if "artists-" in concept_type:
        t, k = 5.5, 3.5
    else:
        t, k = 5.333, 2.5
    if btype == "tanh":
        return round(up_t / 2.0 * (math.tanh(k * (10 * beta - t)) + 1))
    if btype == "sigmoid":
        return round(up_t * _sigmoid(2.0 * k * (10 * beta - t)))
    raise ValueError(f"btype must be 'sigmoid' or 'tanh', not {btype!r}")


def self_validating_steps(
    token_embeddings: torch.Tensor,
    input_space: Subspace,
    concept: Subspace,
    attention_mask: Optional[torch.Tensor] = None,
    up_t: int = DEFAULT_UP_T,
    concept_type: str = "nudity",
    btype: str = "sigmoid",
) -> int:
    """Self-validating filter: ``beta_adjusted = f_beta(self_validating_beta(...), up_t)``.

    The reference uses the filtered embedding for loop indices ``i <= beta_adjusted``
    (``beta_adjusted + 1`` steps, counted from the first, noisiest step) and the original
    embedding afterwards.  The less the filtered embedding resembles the original (larger beta),
    the more steps use it.  See :func:`use_filtered_embedding`.
    """
    beta = self_validating_beta(token_embeddings, input_space, concept, attention_mask)
    return f_beta(beta, up_t=up_t, btype=btype, concept_type=concept_type)


def use_filtered_embedding(
    step_index: int,
    svf_last_step: Optional[int] = None,
    re_attn_t: Tuple[int, int] = DEFAULT_RE_ATTN_T,
) -> bool:
    """Whether loop index ``step_index`` uses the filtered embedding ([pipe] ``__call__``).

    With the self-validating filter (``svf_last_step`` from :func:`self_validating_steps`):
    ``step_index <= svf_last_step``.  Without it: ``re_attn_t[0] <= step_index <= re_attn_t[1]``
    (default ``(-1, 1001)``: every step).
    """
    if svf_last_step is not None:
        return step_index <= svf_last_step
    return re_attn_t[0] <= step_index <= re_attn_t[1]


# --------------------------------------------------------------------------- Fourier re-attention


def reattention_stage(channels: int, model_channels: int = 320,
                      hyp: Iterable[float] = DEFAULT_FREEU_HYP) -> Optional[Tuple[float, float]]:
    """``(b, s)`` for a decoder stage whose backbone feature has ``channels`` channels, else None.

    [flu] 160-187 / 317-345: 1280 channels (``4 * model_channels``; SD1/SDXL 320) → ``(b1, s1)``,
    640 (``2 * model_channels``) → ``(b2, s2)``; other stages untouched.  ``hyp`` = ``(b1, b2, s1,
    s2)`` (``--freeu_hyp``; default 1.0-1.0-0.9-0.2).
    """
    b1, b2, s1, s2 = (float(v) for v in hyp)
    if channels == 4 * model_channels:
        return b1, s1
    if channels == 2 * model_channels:
        return b2, s2
    return None


def safeguard_reattention(h: torch.Tensor, skip: torch.Tensor, b: float, s: float,
                          pairs: Sequence[Tuple[int, int]], threshold: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAFREE's latent re-attention at one decoder stage ([flu] 160-187 with ``safree="low"``), on a
    batch whose rows are paired: ``pairs`` = ``[(filtered_row, original_row), …]``.

    * backbone, every row: ``h[:, :C//2] *= b`` (the reference's literal 640/320 = half of 1280/640);
    * skip, each filtered-prompt row only: ``skip[f] = safeguard_low_fourier_filter(skip[f], skip[o],
      threshold, s)`` against the row ``o`` conditioned on the original prompt (reference batch:
      ``[uncond, filtered, original]``, pair ``(1, 2)``); other rows bit-identical.
    Out of place; returns ``(h, skip)``.
    """
    if b != 1.0:
        half = h.shape[1] // 2
        h = torch.cat([h[:, :half] * b, h[:, half:]], dim=1)
    if pairs:
        skip = skip.clone()
        for f, o in pairs:
            skip[f] = safeguard_low_fourier_filter(skip[f], skip[o], threshold, s)
    return h, skip


# --------------------------------------------------------------------------- SAFREE's own latent re-attention
#
# Read from jaehong31/SAFREE @b8b2c3f (files unchanged since the initial commit f98c1b5),
# ``free_lunch_utils.py``.  Cited as ``[flu]`` with line numbers of that file; ``[gen]`` is
# ``generate_safree.py``, ``[pipe]`` ``models/modified_stable_diffusion_pipeline.py``, ``[xl]``
# ``models/modified_stable_diffusion_xl_pipeline.py`` of the same commit.
#
# Batch layout ([pipe] 506-536, only when the pipeline gets ``lra=True``): the UNet is run on
# three rows ``[uncond, cond_used_this_step, cond_original]`` — row 1 is the SAFREE-filtered
# conditional embedding inside the step window (else the original), row 2 always the original
# conditional embedding; row 2's noise prediction is discarded by CFG.  The SafeGuard filters
# hard-code ``x_freq[1]`` (modified, "filtered") and ``x_freq[2]`` (compared, "original").
#
# What the released code actually runs: [gen] 227-228 call ``register_free_upblock2d(pipe, b1=..,
# b2=.., s1=.., s2=..)`` WITHOUT ``safree=``, so ``safree is None`` and the patched forward takes
# the ``else: NotImplementedError("Not implemented")`` branch ([flu] 185-186, 343-344), which
# constructs the exception without raising it: neither the backbone scaling nor any Fourier
# filter is applied.  ``-lra`` therefore only adds the discarded third batch row.  The functions
# below implement the ``safree='low' | 'high' | 'all'`` branches exactly; ``safree=None``
# reproduces the no-op.



def _sg_window(h: int, w: int, threshold: int) -> Tuple[slice, slice]:
    # [flu] 29/32: crow, ccol = H // 2, W // 2; [crow - threshold : crow + threshold, ...].  Plain
    # slices as in the reference (a negative start wraps around exactly as there).
    crow, ccol = h // 2, w // 2
    return slice(crow - threshold, crow + threshold), slice(ccol - threshold, ccol + threshold)


def _sg_spectrum(x: torch.Tensor) -> torch.Tensor:
    # [flu] 22-26: cast to float32 (also float64 is cast down), fftn over (-2, -1), fftshift.
    return torch.fft.fftshift(torch.fft.fftn(x.to(torch.float32), dim=(-2, -1)), dim=(-2, -1))


def _sg_inverse(freq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # [flu] 42-46: ifftshift, ifftn, real part, cast back to the input dtype.
    return torch.fft.ifftn(torch.fft.ifftshift(freq, dim=(-2, -1)), dim=(-2, -1)).real.to(dtype)


def _sg_low_spectrum(ff: torch.Tensor, fo: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    rs, cs = _sg_window(ff.shape[-2], ff.shape[-1], threshold)
    low_f, low_o = ff[..., rs, cs], fo[..., rs, cs]
    c = low_o - low_f  # [flu] 35: C = low_x_freq[2] - low_x_freq[1]
    mask = torch.where(c.real > 0.0, low_f, scale)  # [flu] 37
    out = ff.clone()
    out[..., rs, cs] = mask  # [flu] 39
    return out


def _check_pair(filtered: torch.Tensor, original: torch.Tensor) -> None:
    if filtered.shape != original.shape:
        raise ValueError(
            f"filtered {tuple(filtered.shape)} and original {tuple(original.shape)} differ in shape")
    if filtered.ndim < 2:
        raise ValueError("features need at least two (spatial) dimensions (..., H, W)")


def safeguard_low_fourier_filter(
    filtered: torch.Tensor, original: torch.Tensor, threshold: int = 1, scale: float = 0.9
) -> torch.Tensor:
    """SAFREE's ``SafeGuard_Low_Fourier_filter`` ([flu] 21-47) on explicit rows.

    ``filtered``: skip features of the row conditioned on the (SAFREE-filtered) prompt, i.e. batch
    row 1 of ``res_hidden_states``; ``original``: the same features of the row conditioned on the
    original prompt (batch row 2).  Both ``(..., H, W)`` (e.g. ``(C, H, W)``), same shape.
    Returns the new ``filtered`` row, in ``filtered``'s dtype (computed in float32, as the
    reference, which casts even float64 down).

    With ``F = fftshift(fft2(filtered))``, ``G = fftshift(fft2(original))`` and the window
    ``W = [H//2 - threshold, H//2 + threshold) x [W//2 - threshold, W//2 + threshold)`` (for
    ``threshold = 1`` a 2x2 block holding the DC term and frequencies -1 on each axis):
    ``F[w] <- F[w] if Re(G[w] - F[w]) > 0 else complex(scale, 0)`` for every channel and every
    ``w`` in W; elsewhere F is kept; result ``Re(ifft2(ifftshift(F)))``.  ``scale`` is an
    *absolute* replacement value for the (unnormalised) coefficient, not a factor; when the two
    rows are equal (Re difference 0) every window coefficient is replaced.  The reference calls
    it with ``threshold=1`` and ``scale = s1`` at 1280 channels, ``s2`` at 640 ([flu] 172/175,
    330/333); ``normalize`` and ``dist_imag`` are unused there.
    """
    _check_pair(filtered, original)
    spec = _sg_low_spectrum(_sg_spectrum(filtered), _sg_spectrum(original), threshold, scale)
    return _sg_inverse(spec, filtered.dtype)
