"""SAFREE math (safegen_core.safree) against straightforward re-implementations of the reference.

The ``_ref_*`` functions below are written from the reference text of jaehong31/SAFREE
``models/modified_stable_diffusion_pipeline.py`` (``projection_matrix``, ``safree_projection``,
``projection_and_orthogonal``, ``f_beta``) and in numpy float64 with
explicit pseudo-inverses and loops — deliberately not sharing code with the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from safegen_core.safree import (
    reattention_stage,
    DEFAULT_ALPHA,
    DEFAULT_FREEU_HYP,
    DEFAULT_RE_ATTN_T,
    DEFAULT_UP_T,
    f_beta,
    flag_tokens,
    project_all_tokens,
    project_tokens,
    projection_matrix,
    safree_projection,
    self_validating_beta,
    self_validating_steps,
    span_subspace,
    token_distances,
    toxic_subspace,
    use_filtered_embedding,
)


# ----------------------------------------------------------------- independent references


def _ref_projection_matrix(vectors: np.ndarray) -> np.ndarray:
    E = vectors.T  # reference: projection_matrix(embeddings.T)
    return E @ np.linalg.pinv(E.T @ E) @ E.T


def _ref_safree_projection(text_e, p_emb, concept_emb, alpha, max_length=77):
    P_c = _ref_projection_matrix(concept_emb)
    P_m = _ref_projection_matrix(p_emb)
    n_t, dim = p_emb.shape
    I_m_cs = np.eye(dim) - P_c
    dist_vec = I_m_cs @ p_emb.T
    dist_p_emb = np.linalg.norm(dist_vec, axis=0)
    means = []
    for i in range(n_t):
        means.append(np.mean(np.concatenate((dist_p_emb[:i], dist_p_emb[i + 1:]))))
    rm_vector = (dist_p_emb < (1.0 + alpha) * np.array(means)).astype(np.float64)
    ones_tensor = np.ones(max_length)
    ones_tensor[1:n_t + 1] = rm_vector
    new_text_e = (I_m_cs @ P_m @ text_e.T).T
    merged = np.where(ones_tensor[:, None].astype(bool), text_e, new_text_e)
    return merged, rm_vector, dist_p_emb


def _ref_beta(text_e, p_emb, concept_emb, attn_mask):
    P_c = _ref_projection_matrix(concept_emb)
    P_m = _ref_projection_matrix(p_emb)
    dim = text_e.shape[1]
    proj = ((np.eye(dim) - P_c) @ P_m @ text_e.T).T
    a, b = proj[attn_mask == 1], text_e[attn_mask == 1]
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-8)
    return 1 - cos.mean()


def _ref_f_beta(z, upperbound_timestep=10, concept_type="nudity"):
    t, k = (5.5, 3.5) if "artists-" in concept_type else (5.333, 2.5)
    return round(upperbound_timestep * (1 / (1 + math.exp(-(2.0 * k * (10 * z - t))))))


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


MAX_DIFF: dict = {}


# ----------------------------------------------------------------- subspace / projection


@pytest.mark.parametrize("n,d", [(5, 32), (17, 768), (40, 64)])
def test_projection_matrix_matches_reference(n, d):
    v = _rand((n, d), seed=n + d)
    ours = projection_matrix(v)
    ref = _ref_projection_matrix(v.double().numpy())
    diff = float(np.abs(ours.double().numpy() - ref).max())
    MAX_DIFF[f"projection_matrix n={n} D={d}"] = diff
    assert diff <= 1e-5
    assert ours.dtype == v.dtype and ours.shape == (d, d)
    # idempotent and symmetric
    assert torch.allclose(ours @ ours, ours, atol=1e-5)
    assert torch.allclose(ours, ours.T, atol=1e-6)


def test_dependent_vectors_do_not_add_directions():
    v = _rand((4, 64), seed=1)
    dup = torch.cat([v, v[:2] * 3.0, v[1:2] + v[3:4]])
    assert span_subspace(dup).rank == 4
    assert torch.allclose(projection_matrix(dup), projection_matrix(v), atol=1e-5)


@pytest.mark.parametrize("d,n_t,k,seed", [(64, 6, 5, 0), (768, 12, 17, 1), (32, 3, 2, 2)])
def test_safree_projection_matches_reference(d, n_t, k, seed):
    text_e = _rand((77, d), seed=seed * 10 + 1)
    p_emb = _rand((n_t, d), seed=seed * 10 + 2)
    p_emb[n_t // 2] *= 2.5  # masking this token moves the prompt far from C: flagged
    concepts = _rand((k, d), seed=seed * 10 + 3)
    ref_e, ref_rm, ref_dist = _ref_safree_projection(
        text_e.double().numpy(), p_emb.double().numpy(), concepts.double().numpy(), DEFAULT_ALPHA
    )
    concept = toxic_subspace(concepts)
    dist = token_distances(p_emb, concept)
    assert np.abs(dist.double().numpy() - ref_dist).max() <= 1e-4 * max(1.0, ref_dist.max())
    ours, flagged, input_space = safree_projection(text_e, p_emb, concept, DEFAULT_ALPHA)
    assert flagged.tolist() == [not bool(r) for r in ref_rm]
    assert bool(flagged[n_t // 2])
    diff = float(np.abs(ours.double().numpy() - ref_e).max())
    MAX_DIFF[f"safree_projection D={d} n_t={n_t} K={k}"] = diff
    assert diff <= 1e-5
    # unflagged positions are returned bit-for-bit
    keep = torch.ones(77, dtype=torch.bool)
    keep[1:n_t + 1] = ~flagged
    assert torch.equal(ours[keep], text_e[keep])
    # batched (B, L, D) input gives the same per batch entry
    batched = project_tokens(text_e.unsqueeze(0).repeat(2, 1, 1), input_space, concept, flagged)
    assert torch.equal(batched[0], ours) and torch.equal(batched[1], ours)


def test_far_tokens_come_back_unchanged():
    d, n_t = 64, 7
    concepts = _rand((5, d), seed=11)
    concept = toxic_subspace(concepts)
    # every masked prompt equally far from C: nobody is 1% farther than the others' mean
    base = concept.complement(_rand((n_t, d), seed=12))
    base = base / base.norm(dim=1, keepdim=True)
    p_emb = base * 3.0 + concept.project(_rand((n_t, d), seed=13))
    flagged = flag_tokens(p_emb, concept, DEFAULT_ALPHA)
    assert not bool(flagged.any())
    text_e = _rand((77, d), seed=14)
    out, flagged2, _ = safree_projection(text_e, p_emb, concept, DEFAULT_ALPHA)
    assert torch.equal(out, text_e)
    # a token inside the input span and orthogonal to C is a fixed point of (I - P_C) P_I
    input_space = span_subspace(p_emb)
    cross = (concept.basis.double() @ input_space.basis.double().T)  # (r_C, r_I)
    null = torch.linalg.svd(cross, full_matrices=True).Vh[cross.shape[0]:]  # directions of I orthogonal to C
    assert null.shape[0] >= 1
    tok = (null[:1] @ input_space.basis.double()).float() * 2.0
    assert float((concept.basis @ tok.T).abs().max()) <= 1e-5
    assert torch.allclose(project_all_tokens(tok, input_space, concept), tok, atol=1e-5)


def test_token_inside_subspace_is_flagged_and_projected_orthogonal():
    d, n_t, toxic = 96, 6, 3
    concepts = _rand((4, d), seed=21)
    concept = toxic_subspace(concepts)
    mix = concepts.mean(0, keepdim=True)
    # with the toxic token present the prompt sits near C; masking it leaves a prompt far from C
    p_emb = mix.repeat(n_t, 1) + 0.05 * _rand((n_t, d), seed=22)
    p_emb[toxic] = concept.complement(_rand((1, d), seed=23))[0] * 2.0
    flagged = flag_tokens(p_emb, concept, DEFAULT_ALPHA)
    assert flagged.tolist() == [i == toxic for i in range(n_t)]
    text_e = _rand((77, d), seed=24)
    text_e[1 + toxic] = concepts[1] * 1.3  # the token embedding itself lies in C
    out, _, input_space = safree_projection(text_e, p_emb, concept, DEFAULT_ALPHA)
    new_tok = out[1 + toxic]
    comp_in_c = concept.basis @ new_tok
    assert float(comp_in_c.abs().max()) <= 1e-4 * float(text_e[1 + toxic].norm())
    # it is (I - P_C) P_I e: the input-span component with its C part removed
    expected = concept.complement(input_space.project(text_e[1 + toxic]))
    assert torch.allclose(new_tok, expected, atol=1e-5)
    others = [i for i in range(77) if i != 1 + toxic]
    assert torch.equal(out[others], text_e[others])


def test_extra_concept_vectors_join_the_subspace():
    d = 48
    concepts = _rand((3, d), seed=31)
    ine = _rand((d,), seed=32)  # e.g. an inverted implicit negative embedding
    sub = toxic_subspace(concepts, extra_vectors=[ine])
    assert sub.rank == 4
    assert torch.allclose(sub.project(ine), ine, atol=1e-5)
    ref = _ref_projection_matrix(torch.cat([concepts, ine[None]]).double().numpy())
    assert np.abs(sub.projector.double().numpy() - ref).max() <= 1e-5
    # INE alone (no text concepts) is a valid subspace too, multi-vector embeddings as (k, D)
    only = toxic_subspace(_rand((2, d), seed=33))
    assert only.rank == 2


def test_custom_token_positions():
    d = 32
    concept = toxic_subspace(_rand((2, d), seed=41))
    p_emb = _rand((3, d), seed=42)
    input_space = span_subspace(p_emb)
    text_e = _rand((154, d), seed=43)  # e.g. two 77-token windows
    flagged = torch.tensor([False, True, False])
    out = project_tokens(text_e, input_space, concept, flagged, token_positions=[80, 81, 82])
    changed = (out != text_e).any(dim=1).nonzero().flatten().tolist()
    assert changed == [81]


def test_single_token_is_flagged_like_reference():
    # reference: mean over an empty set is NaN, (d < NaN) is False -> token removed
    concept = toxic_subspace(_rand((2, 16), seed=51))
    assert flag_tokens(_rand((1, 16), seed=52), concept).tolist() == [True]


# ----------------------------------------------------------------- self-validating filter


def test_self_validating_beta_matches_reference():
    d, n_t = 64, 8
    text_e = _rand((77, d), seed=61)
    p_emb = _rand((n_t, d), seed=62)
    concepts = _rand((6, d), seed=63)
    mask = torch.zeros(77, dtype=torch.long)
    mask[: n_t + 2] = 1  # BOS, tokens, first EOS
    beta = self_validating_beta(text_e, span_subspace(p_emb), toxic_subspace(concepts), mask)
    ref = _ref_beta(text_e.double().numpy(), p_emb.double().numpy(), concepts.double().numpy(), mask.numpy())
    MAX_DIFF["svf beta"] = abs(beta - ref)
    assert abs(beta - ref) <= 1e-5
    steps = self_validating_steps(text_e.unsqueeze(0), span_subspace(p_emb), toxic_subspace(concepts), mask)
    assert steps == _ref_f_beta(ref)


def test_f_beta_matches_reference_and_is_monotone():
    betas = np.linspace(0.0, 1.0, 2001)
    for ctype in ("nudity", "artists-VanGogh"):
        vals = [f_beta(float(b), up_t=DEFAULT_UP_T, concept_type=ctype) for b in betas]
        assert vals == [_ref_f_beta(float(b), DEFAULT_UP_T, ctype) for b in betas]
        assert all(a <= b for a, b in zip(vals, vals[1:]))  # non-decreasing in beta
        assert vals[0] == 0 and vals[-1] == DEFAULT_UP_T
    tanh = [f_beta(float(b), btype="tanh") for b in betas]
    assert all(a <= b for a, b in zip(tanh, tanh[1:]))
    assert f_beta(0.5, up_t=20) >= f_beta(0.5, up_t=10)
    with pytest.raises(ValueError):
        f_beta(0.5, btype="nope")


def test_self_validating_steps_grow_as_filtering_changes_more():
    # A larger toxic subspace inside the prompt's span removes more of each token:
    # cosine similarity drops, beta rises, the number of filtered steps does not decrease.
    d, n_t = 64, 10
    p_emb = _rand((n_t, d), seed=71)
    input_space = span_subspace(p_emb)
    text_e = input_space.project(_rand((77, d), seed=72))
    betas, steps = [], []
    for k in range(0, n_t):
        concept = toxic_subspace(p_emb[:k]) if k else toxic_subspace(torch.zeros(1, d))
        betas.append(self_validating_beta(text_e, input_space, concept))
        steps.append(self_validating_steps(text_e, input_space, concept))
    assert betas[0] == pytest.approx(0.0, abs=1e-5)
    assert all(a <= b + 1e-6 for a, b in zip(betas, betas[1:]))
    assert all(a <= b for a, b in zip(steps, steps[1:]))
    assert steps[0] == 0 and steps[-1] > 0


def test_use_filtered_embedding_windows():
    assert DEFAULT_RE_ATTN_T == (-1, 1001)
    assert all(use_filtered_embedding(i) for i in range(50))
    assert [use_filtered_embedding(i, svf_last_step=3) for i in range(6)] == [True] * 4 + [False] * 2
    window = [use_filtered_embedding(i, re_attn_t=(2, 4)) for i in range(6)]
    assert window == [False, False, True, True, True, False]


# ----------------------------------------------------------------- re-attention stages


def test_reattention_stages():
    assert reattention_stage(1280) == (1.0, 0.9)
    assert reattention_stage(640) == (1.0, 0.2)
    assert reattention_stage(320) is None
    assert reattention_stage(2560, model_channels=640, hyp=(1.1, 1.2, 0.6, 0.4)) == (1.1, 0.6)
    assert DEFAULT_FREEU_HYP == (1.0, 1.0, 0.9, 0.2)


def test_report_max_diffs(capsys):
    if MAX_DIFF:
        with capsys.disabled():
            print("\nSAFREE max |ours - reference|:", {k: f"{v:.3g}" for k, v in MAX_DIFF.items()})
