"""SAFREE's latent re-attention and SDXL projection against the reference jaehong31/SAFREE @b8b2c3f.

Reference files (unchanged since the initial commit f98c1b5): ``free_lunch_utils.py``
(``SafeGuard_Low_Fourier_filter`` 21-47, ``SafeGuard_High_Fourier_filter`` 49-85, patched up-block
forwards 160-187 / 317-345), ``models/modified_stable_diffusion_xl_pipeline.py`` (``safree_projection``
103-145, ``_masked_encode_prompt`` 335-353, ``__call__`` 1460-1487 and 1599-1603).

The SDXL projection's reference (``_np_safree_projection_sdxl``) is checked against the runtime on
ComfyUI's own encoders in tests/inproc/test_safree_node.py.  The ``_np_*`` functions are independent re-implementations written from that text in numpy float64
with explicit loops and pseudo-inverses; they share no code with ``safegen_core.safree``.  Where the
pack differs from the reference on purpose: docs/safree.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safegen_core.safree import (
    reattention_stage,
    safeguard_low_fourier_filter,
    safeguard_reattention,
)

RTOL = 1e-5


def _close(actual, expected, rtol=RTOL):
    """Max abs error relative to the largest magnitude of the expected values."""
    def arr(v):
        return np.asarray(v.detach().double().numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float64)

    a, e = arr(actual), arr(expected)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(float(np.abs(e).max()), 1e-30)
    err = float(np.abs(a - e).max()) / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"
    return err


# ----------------------------------------------------------------- independent numpy references


def _np_spectrum(x):
    return np.fft.fftshift(np.fft.fft2(np.asarray(x, dtype=np.float64), axes=(-2, -1)), axes=(-2, -1))


def _np_inverse(X):
    return np.fft.ifft2(np.fft.ifftshift(X, axes=(-2, -1)), axes=(-2, -1)).real


def _np_low_batch(x, threshold, scale):
    """free_lunch_utils.py 21-47: row 1 of the batch, compared with row 2, window around the centre."""
    X = _np_spectrum(x)
    B, C, H, W = X.shape
    crow, ccol = H // 2, W // 2
    new = X.copy()
    margins = []
    for c in range(C):
        for r in range(crow - threshold, crow + threshold):
            for q in range(ccol - threshold, ccol + threshold):
                d = (X[2, c, r, q] - X[1, c, r, q]).real  # C = low_x_freq[2] - low_x_freq[1]
                margins.append(abs(d))
                if d > 0.0:
                    new[1, c, r, q] = X[1, c, r, q]
                else:
                    new[1, c, r, q] = complex(scale, 0.0)
    return _np_inverse(new), min(margins)


def _np_projection_matrix(E):
    return E @ np.linalg.pinv(E.T @ E) @ E.T


def _np_safree_projection_sdxl(cat_text_embeddings, masked_embs, concept_embs, alpha, max_length=77):
    """modified_stable_diffusion_xl_pipeline.py 1460-1487 + safree_projection 103-145, then 1603."""
    cat = np.array(cat_text_embeddings, dtype=np.float64)  # [uncond, cond] x 77 x 2048
    text_embeddings = cat[..., 768:]
    project_matrix = _np_projection_matrix(np.asarray(concept_embs, np.float64).T)
    p_emb = np.asarray(masked_embs, np.float64)
    masked_project_matrix = _np_projection_matrix(p_emb.T)
    n_t, dim = p_emb.shape
    I_m_cs = np.eye(dim) - project_matrix
    dist_p_emb = np.linalg.norm(I_m_cs @ p_emb.T, axis=0)
    means = [np.mean(np.concatenate((dist_p_emb[:i], dist_p_emb[i + 1:]))) for i in range(n_t)]
    rm_vector = (dist_p_emb < (1.0 + alpha) * np.array(means)).astype(np.float64)
    ones_tensor = np.ones(max_length)
    ones_tensor[1:n_t + 1] = rm_vector
    uncond_e, text_e = text_embeddings[0], text_embeddings[1]
    new_text_e = (I_m_cs @ masked_project_matrix @ text_e.T).T
    merged = np.where(ones_tensor[:, None].astype(bool), text_e, new_text_e)
    out = cat.copy()
    out[0, :, 768:] = uncond_e
    out[1, :, 768:] = merged
    thr_margin = np.min(np.abs(dist_p_emb - (1.0 + alpha) * np.array(means)))
    return out, rm_vector == 0, thr_margin


# ----------------------------------------------------------------- SafeGuard low filter


def _batch_low(x, threshold=1, scale=0.9):
    """The implementation on the reference's batch layout: row 1 filtered against row 2."""
    _, out = safeguard_reattention(x, x, 1.0, scale, [(1, 2)], threshold)
    return out


@pytest.mark.parametrize("shape,threshold,scale", [((3, 4, 8, 8), 1, 0.9), ((3, 5, 7, 9), 1, 0.2),
                                                   ((4, 3, 16, 12), 2, 0.5), ((3, 2, 2, 2), 1, 0.9)])
@pytest.mark.parametrize("seed", [0, 1])
def test_low_filter_matches_numpy_reference(shape, threshold, scale, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    ref, margin = _np_low_batch(x.numpy(), threshold, scale)
    assert margin > 1e-3  # decisions are not at the float32 rounding edge, so the comparison is meaningful
    row = safeguard_low_fourier_filter(x[1], x[2], threshold=threshold, scale=scale)
    _close(row, ref[1])
    out = _batch_low(x, threshold, scale)
    assert torch.equal(out[1], row)


@pytest.mark.parametrize("shape,threshold",
                         [((3, 4, 8, 8), 1), ((3, 2, 4, 4), 2), ((5, 3, 6, 6), 2), ((3, 2, 6, 6), 3)])
def test_low_filter_other_windows(shape, threshold):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    ref, margin = _np_low_batch(x.numpy(), threshold, 0.9)
    assert margin > 1e-4
    _close(_batch_low(x, threshold, 0.9)[1], ref[1])


def test_reattention_changes_only_the_paired_rows_and_scales_the_backbone():
    g = torch.Generator().manual_seed(3)
    h, skip = torch.randn(6, 8, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    # a ComfyUI batch of 2 images: [cond0, cond1, uncond0, uncond1, original0, original1]
    oh, osk = safeguard_reattention(h, skip, 1.3, 0.9, [(0, 4), (1, 5)])
    for r in (2, 3, 4, 5):
        assert torch.equal(osk[r], skip[r])
    for f, o in ((0, 4), (1, 5)):
        assert torch.equal(osk[f], safeguard_low_fourier_filter(skip[f], skip[o], 1, 0.9))
        assert not torch.allclose(osk[f], skip[f], atol=1e-3)
    assert torch.equal(oh[:, :4], h[:, :4] * 1.3) and torch.equal(oh[:, 4:], h[:, 4:])
    # b = 1 and no pairs is the identity
    ih, isk = safeguard_reattention(h, skip, 1.0, 0.9, [])
    assert ih is h and isk is skip
    # stages: 4x and 2x the model's base channels (SD1/SDXL: 1280, 640), as [flu] 160-187
    assert reattention_stage(1280) == (1.0, 0.9) and reattention_stage(640) == (1.0, 0.2)
    assert reattention_stage(320) is None


def _window_cosines(c, h, w):
    """A real pattern whose spectrum has a positive real part at the four window frequencies
    (ky, kx) in {-1, 0}^2 (threshold 1): DC + cos along y + cos along x + cos along the diagonal."""
    yy = torch.arange(h, dtype=torch.float64)[:, None]
    xx = torch.arange(w, dtype=torch.float64)[None, :]
    p = 1 + torch.cos(2 * torch.pi * yy / h) + torch.cos(2 * torch.pi * xx / w) \
        + torch.cos(2 * torch.pi * (yy / h + xx / w))
    return p.expand(c, h, w).to(torch.float32)


def test_low_filter_keeps_when_original_is_higher_and_replaces_otherwise():
    g = torch.Generator().manual_seed(11)
    filt = torch.randn(4, 8, 8, generator=g)
    bump = 50.0 * _window_cosines(4, 8, 8)
    # Re(G - F) > 0 at every window coefficient: the filtered row comes back unchanged
    keep = safeguard_low_fourier_filter(filt, filt + bump, scale=0.9)
    _close(keep, filt, rtol=1e-6)
    # Re(G - F) < 0 everywhere, or equal rows (Re difference exactly 0): all four coefficients become
    # `scale`, whatever the original row is
    lower = safeguard_low_fourier_filter(filt, filt - bump, scale=0.9)
    same = safeguard_low_fourier_filter(filt, filt.clone(), scale=0.9)
    _close(lower, same, rtol=1e-6)
    expected = _np_spectrum(filt.numpy())
    expected[:, 3:5, 3:5] = 0.9
    _close(same, _np_inverse(expected))
    assert not torch.allclose(same, filt, atol=1e-2)


def test_low_filter_changes_only_window_frequencies():
    g = torch.Generator().manual_seed(5)
    filt, orig = torch.randn(3, 10, 12, generator=g), torch.randn(3, 10, 12, generator=g)
    out = safeguard_low_fourier_filter(filt, orig, threshold=1, scale=0.2)
    D = np.fft.fft2(out.double().numpy() - filt.double().numpy(), axes=(-2, -1))
    H, W = 10, 12
    allowed = np.zeros((H, W), dtype=bool)
    for ky in (-1, 0):
        for kx in (-1, 0):
            allowed[ky % H, kx % W] = True
            allowed[(-ky) % H, (-kx) % W] = True  # Hermitian partner (real part of the ifft)
    assert np.abs(D[:, ~allowed]).max() < 1e-4
    assert np.abs(D[:, allowed]).max() > 1.0


def test_low_filter_dtypes():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=g)
    out16 = safeguard_low_fourier_filter(x[1].half(), x[2].half(), scale=0.9)
    assert out16.dtype == torch.float16
    # computed in float32 from the fp16 values, cast back (the reference's x.type(torch.float32) / .type(dtype))
    ref, _ = _np_low_batch(x.half().float().numpy(), 1, 0.9)
    _close(out16.float(), torch.from_numpy(ref[1]).half().float(), rtol=2e-3)
    out64 = safeguard_low_fourier_filter(x[1].double(), x[2].double(), scale=0.9)
    assert out64.dtype == torch.float64
    # float64 is computed in float32, as the reference's x.type(torch.float32)
    assert torch.equal(out64, safeguard_low_fourier_filter(x[1], x[2], scale=0.9).double())
