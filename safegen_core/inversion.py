"""Concept inversion (textual inversion on a possibly unlearned model) — the INE method.

c* = argmin_c E_{x0, t, ε} ‖ε − ε_θ(x_t, c, t)‖² with every model weight frozen; only the
n new token vectors train (INE; NYU-DICE-Lab/circumventing-concept-erasure for ESD/UCE).

Objectives
* ``ldm``    — the plain denoising loss above on the given (unlearned) model.
* ``guided`` — for a model defended at sampling time by a negative prompt / CFG (CCE,
  ``np/concept_inversion.py``): the *guided* prediction
  ε̂ = ε(x_t, c_neg) + g·(ε(x_t, c*) − ε(x_t, c_neg)) must match ε, so the learned prompt
  embedding survives the defence that will be applied at sampling.

Everything here works in k-diffusion terms (x = x0 + σ·ε, the convention of ComfyUI's
samplers); the caller runs the model and passes the predictions (``inversion_loss(objective, ε,
ε(x_t, c*), ε(x_t, c_neg))``), so this module needs no ComfyUI import.
"""
from __future__ import annotations

import torch

OBJECTIVES = ("ldm", "guided")


def sample_batch(latents: torch.Tensor, sigmas: torch.Tensor, batch_size: int, g: torch.Generator):
    """Draw a training batch: images, DDPM timesteps uniform in [0, T), noise.

    ``sigmas`` is the model's k-diffusion σ for each of its T training timesteps (ascending).
    Returns (x_noisy, sigma[b], eps, idx).
    """
    n = latents.shape[0]
    idx = torch.randint(0, n, (batch_size,), generator=g)
    t = torch.randint(0, sigmas.shape[0], (batch_size,), generator=g)
    x0 = latents[idx]
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    sigma = sigmas[t].to(x0.dtype)
    x = x0 + eps * sigma.view(-1, *([1] * (x0.ndim - 1)))
    return x, sigma, eps, idx


def guided_eps(eps_cond: torch.Tensor, eps_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance with a negative: ε_neg + g·(ε_cond − ε_neg)."""
    return eps_neg + scale * (eps_cond - eps_neg)


def inversion_loss(objective: str, eps, eps_cond, eps_neg=None, scale: float = 1.0) -> torch.Tensor:
    if objective == "ldm":
        pred = eps_cond
    elif objective == "guided":
        if eps_neg is None:
            raise ValueError("objective 'guided' needs the negative prediction")
        pred = guided_eps(eps_cond, eps_neg, scale)
    else:
        raise ValueError(f"unknown objective {objective!r}; one of {OBJECTIVES}")
    return torch.nn.functional.mse_loss(pred.float(), eps.float())


def init_vectors(init_token_vectors: torch.Tensor, num_vectors: int, g: torch.Generator | None = None,
                 noise: float = 0.0) -> torch.Tensor:
    """Initial n vectors from the token vectors of the init text (cycled if fewer than n), plus
    optional Gaussian ``noise`` (relative to their std). An init text with no tokens is an error."""
    if init_token_vectors is None or init_token_vectors.shape[0] == 0:
        raise ValueError("init text gave no tokens")
    reps = -(-num_vectors // init_token_vectors.shape[0])
    v = init_token_vectors.repeat(reps, 1)[:num_vectors].clone().float()
    if noise > 0:
        v = v + noise * v.std() * torch.randn(v.shape, generator=g)
    return v


# File layout of embeddings (ComfyUI / A1111 / diffusers conventions):
#   SD1.x : {"emb_params": [n, 768]}   (A1111 safetensors; ComfyUI takes the first value)
#   SDXL  : {"clip_l": [n, 768], "clip_g": [n, 1280]}   (ComfyUI's and kohya's SDXL format)
def to_file_tensors(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if set(vectors) == {"l"}:
        return {"emb_params": vectors["l"].detach().float().contiguous()}
    out = {}
    for k, v in vectors.items():
        out[f"clip_{k}"] = v.detach().float().contiguous()
    return out


def from_file_tensors(tensors: dict[str, torch.Tensor], name: str = "<embedding>") -> dict[str, torch.Tensor]:
    """Map an embedding file's tensors to encoder keys ('l', 'g'), accepting the common layouts:
    ``emb_params`` / ``string_to_param`` (A1111), ``clip_l``/``clip_g``, diffusers ``{token: T}``."""
    out = {}
    for k, v in tensors.items():
        kk = k.split(".")[-1] if k.startswith("string_to_param") else k
        if kk in ("clip_l", "l"):
            out["l"] = v
        elif kk in ("clip_g", "g"):
            out["g"] = v
    if not out:
        vals = [v for v in tensors.values() if isinstance(v, torch.Tensor)]
        if len(vals) != 1:
            raise ValueError(f"{name}: cannot tell which tensor is the embedding (keys: {list(tensors)[:6]})")
        v = vals[0]
        out["l" if v.shape[-1] == 768 else ("g" if v.shape[-1] == 1280 else "?")] = v
    for k, v in list(out.items()):
        if v.ndim == 1:
            out[k] = v.unsqueeze(0)
        elif v.ndim != 2:
            raise ValueError(f"{name}: embedding tensor must be [n, width], got {tuple(v.shape)}")
    return out


def check_embedding(vectors: dict[str, torch.Tensor], widths: dict[str, int], name: str) -> None:
    """Raise a clear error on a width mismatch, a missing encoder or NaN/inf values."""
    for enc, w in widths.items():
        if enc not in vectors:
            have = {k: tuple(v.shape) for k, v in vectors.items()}
            raise ValueError(f"{name}: no vectors for text encoder clip_{enc} (width {w}); file has {have}. "
                             f"Was it made for another model family (SD1.x vs SDXL)?")
        v = vectors[enc]
        if v.shape[-1] != w:
            raise ValueError(f"{name}: clip_{enc} vectors have width {v.shape[-1]}, the CLIP expects {w} "
                             f"(SD1.x/CLIP-L 768, SDXL CLIP-G 1280)")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name}: clip_{enc} vectors contain NaN or inf")
