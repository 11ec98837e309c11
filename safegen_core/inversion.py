"""Concept inversion (textual inversion on a possibly unlearned model) — the INE method, and the
CCE objectives for sampling-time defences.

c* = argmin_c E_{x0, t, ε} ‖ε − ε_θ(x_t, c, t)‖² with every model weight frozen; only the
n new token vectors train (INE; NYU-DICE-Lab/circumventing-concept-erasure for ESD/UCE).

Reference: CCE = NYU-DICE-Lab/circumventing-concept-erasure @ ``bb7034b7dfe30beeee73b5a61f50ed6938a4daf1``
(line numbers below are of that commit; defaults and differences: docs/inversion.md).

Objectives (``OBJECTIVES``)
* ``ldm``    — the plain denoising loss ‖ε − ε(x_t, c*)‖² on the given (unlearned) model
  (CCE ``esd/concept_inversion.py:959-980``, identical in ``uce/``).
* ``np``     — CCE's Negative-Prompt objective (``np/concept_inversion.py:1004-1008``): the prediction
  under the defence, ε_S + g·(ε(c*) − ε_S), must match the *undefended* model's CFG prediction of the
  safety-concept text, ε_∅ + g·(ε_S − ε_∅). The true noise ε is not in the loss. See
  :func:`cce_np_target`, :func:`cce_np_loss`.
* ``sld``    — CCE's Safe-Latent-Diffusion objective (``sld/concept_inversion.py:1032-1098``): SLD-guided
  prediction with the safety momentum carried over K timesteps sorted in *descending* t, loss on the last
  (smallest-t) one only. See :func:`cce_sld_timesteps`, :func:`cce_sld_step`, :func:`cce_sld_loss`.

k-diffusion vs DDPM (why the reference formulas carry over unchanged)
* CCE noises with diffusers' DDPM ``add_noise``: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (``np/...:987``,
  ``sld/...:1040``). SafeGen's callers use k-diffusion: x = x0 + σ_t·ε with σ_t = √((1−ᾱ_t)/ᾱ_t), i.e.
  x = x_t/√ᾱ_t. ComfyUI feeds the UNet c_in·x = x/√(σ²+1) = √ᾱ_t·x = x_t at the same discrete t and
  the callers recover ε̂ = (x − D(x))/σ (``safegen_comfy/compat.predict_eps``), which for an ε-model is the
  UNet output itself. So for the same (x0, ε, t) every ε̂ here equals CCE's ``model_pred_*``.
* Every CCE target/prediction is an elementwise combination of ε̂'s at one shared x_t, so it is the same
  tensor in both conventions; SLD's threshold λ and scale s_S act on ε-differences, so CCE's numeric
  values (λ = 1.0, s_S = 5000) apply as they are — they would NOT if one used D(x) or x0-predictions.
* The loss is an unweighted MSE on ε (no σ-weighting) in both.
* Timesteps: CCE draws integer DDPM t ∈ [0, T); ``sigmas[t]`` (ascending in t) is the matching σ, so
  "sorted by t descending" = "sorted by σ descending" (noisiest first, as in sampling).

This module runs no model: callers pass the predictions, so it needs no ComfyUI import.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import sld as sld_core
from .weights_io import is_finite

OBJECTIVES = ("ldm", "np", "sld")

CCE_COMMIT = "bb7034b7dfe30beeee73b5a61f50ed6938a4daf1"

# Prompt templates (CCE ``np/concept_inversion.py:422-477``; ``sld/`` 431-486 differs only in the second
# person template, "a DSLR photo portrait of {}"). One template per *sample*, drawn uniformly with
# replacement: ``text = random.choice(self.templates).format(placeholder)`` (np:537, sld:546, esd:534).
# train.sh of every variant uses learnable_property="style" (np/train.sh:9); argparse default "object"
# (np:210).
CCE_OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]
CCE_STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a cropped painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
]
CCE_PERSON_TEMPLATES = ["a photo portrait of {}", "a DSLR portrait of {}"]          # np/esd/uce
CCE_PERSON_TEMPLATES_SLD = ["a photo portrait of {}", "a DSLR photo portrait of {}"]  # sld:483-486
CCE_TEMPLATES = {"object": CCE_OBJECT_TEMPLATES, "style": CCE_STYLE_TEMPLATES, "person": CCE_PERSON_TEMPLATES}


# Reference defaults. "argparse" = the script's default, "train.sh" = what the shipped launch script
# passes (the configuration of the paper's runs). Paths relative to the CCE repo at CCE_COMMIT.
_COMMON = {
    "model": ("CompVis/stable-diffusion-v1-4", "np/train.sh:1"),
    "noise_scheduler": ("DDPMScheduler of the model (SD1.4: T=1000, scaled_linear 0.00085..0.012)", "np:728"),
    "learning_rate": (5e-3, "np/train.sh:15 (argparse default 1e-4, np:255)"),
    "scale_lr": (True, "np/train.sh:15; lr *= grad_accum * batch * num_processes (np:807-810)"),
    "lr_scheduler": ("constant", "np/train.sh:16 (argparse default 'constant', np:267)"),
    "lr_warmup_steps": (0, "np/train.sh:17 (argparse default 500, np:274)"),
    "optimizer": ("AdamW over the whole input-embedding table; non-placeholder rows restored after each "
                  "step", "np:813-819, 1016-1023"),
    "adam_betas": ((0.9, 0.999), "np:284-285"),
    "adam_weight_decay": (1e-2, "np:286"),
    "adam_epsilon": (1e-8, "np:287"),
    "num_vectors": (1, "np:172-175 (train.sh does not set it)"),
    "placeholder_token": ("<art-style>", "np/train.sh:10"),
    "initializer_token": ("art", "np/train.sh:10 (must be a single token, np:757-760)"),
    "learnable_property": ("style", "np/train.sh:9 (argparse default 'object', np:210)"),
    "resolution": (512, "np/train.sh:11 (argparse 512, np:222)"),
    "num_train_images": (25, "np/train.sh:21 (argparse default 1000, np:402)"),
    "repeats": (100, "np:211"),
    "flip_p": (0.5, "np:488 (RandomHorizontalFlip)"),
    "center_crop": (False, "np:229"),
    "mixed_precision": ("fp16", "np/train.sh:23 (argparse 'no', np:308)"),
}
CCE_DEFAULTS = {
    "ldm": {**_COMMON,   # esd/ and uce/ (identical training loop)
            "train_batch_size": (4, "esd/train.sh:12 (argparse 16, esd:232)"),
            "gradient_accumulation_steps": (4, "esd/train.sh:13 (argparse 1, esd:244)"),
            "max_train_steps": (5000, "esd/train.sh:14 (argparse 5000, esd:238)"),
            "effective_lr": (5e-3 * 4 * 4, "scale_lr: 5e-3 * 4 * 4 = 0.08")},
    "np": {**_COMMON,
           "train_batch_size": (4, "np/train.sh:12 (argparse 16, np:232)"),
           "gradient_accumulation_steps": (4, "np/train.sh:13 (argparse 1, np:244)"),
           "max_train_steps": (5000, "np/train.sh:14 (argparse 5000, np:238)"),
           "effective_lr": (5e-3 * 4 * 4, "scale_lr: 5e-3 * 4 * 4 = 0.08"),
           "guidance_scale": (7.5, "np:405"),
           "safety_concept": ("Thomas Kinkade", "np:399 (train.sh passes $SAFETY_CONCEPT, np/train.sh:22)")},
    "sld": {**_COMMON,
            "person_templates": (CCE_PERSON_TEMPLATES_SLD, "sld:483-486"),
            "noise_scheduler": ("DDPMScheduler of the model, set_timesteps(1000) (add_noise unaffected)",
                                "sld:734, 743"),
            "train_batch_size": (1, "sld/train.sh:12 (must be 1: timesteps.item(), sld:1005)"),
            "gradient_accumulation_steps": (4, "sld/train.sh:13"),
            "max_train_steps": (1000, "sld/train.sh:14"),
            "effective_lr": (5e-3 * 4 * 1, "scale_lr: 5e-3 * 4 * 1 = 0.02"),
            "guidance_scale": (7.5, "sld:409"),
            "sld_warmup_steps": (0, "sld:410"),
            "sld_guidance_scale": (5000.0, "sld:411"),
            "sld_threshold": (1.0, "sld:412"),
            "sld_momentum_scale": (0.5, "sld:413"),
            "sld_mom_beta": (0.7, "sld:414"),
            "timestep_range": (90, "sld/train.sh:23 (argparse default 50, sld:416)"),
            "timestep_count": (35, "sld/train.sh:24 (argparse default 13, sld:417)"),
            "safety_concept": ("", "sld:399 (train.sh passes $SAFETY_CONCEPT, sld/train.sh:22)")},
}
# Just the values.
DEFAULTS = {obj: {k: v[0] for k, v in tab.items()} for obj, tab in CCE_DEFAULTS.items()}
# NB: the INE paper's "3000 steps at lr 5e-3" appears nowhere in the CCE repo (its runs: 5000 updates,
# or 1000 for SLD, at 5e-3 *before* --scale_lr).


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
    """Classifier-free guidance with a negative: ε_neg + g·(ε_cond − ε_neg).

    This is also CCE's NP *prediction* (``np/concept_inversion.py:1006``:
    ``model_pred = model_pred_neg + args.guidance_scale * (model_pred_text - model_pred_neg)``)."""
    return eps_neg + scale * (eps_cond - eps_neg)


# ---------------------------------------------------------------------------------------------- CCE: NP
def cce_np_target(eps_uncond: torch.Tensor, eps_safety: torch.Tensor, scale: float) -> torch.Tensor:
    """CCE's target for NP *and* SLD: the undefended CFG prediction of the safety-concept text,
    ε_∅ + g·(ε_S − ε_∅) (``np/concept_inversion.py:1005``; ``sld/concept_inversion.py:1096``).

    ε_∅ = ε(x_t, "") and ε_S = ε(x_t, safety_concept) at the same x_t/t as the learned prediction. It does not
    depend on the learned vectors (CCE computes it in the same UNet batch, un-detached, but no path leads
    to the placeholder rows), so it is returned detached. Same tensor in k-diffusion and DDPM terms (module
    docstring)."""
    return (eps_uncond + scale * (eps_safety - eps_uncond)).detach()


def cce_np_loss(eps_uncond: torch.Tensor, eps_safety: torch.Tensor, eps_text: torch.Tensor,
                scale: float) -> torch.Tensor:
    """CCE NP loss (``np/concept_inversion.py:1004-1008``)::

        pred   = ε_S + g·(ε(c*) − ε_S)          # the defended sampler's prediction, negative = safety text
        target = ε_∅ + g·(ε_S − ε_∅)            # undefended CFG prediction of the safety text
        loss   = mean((pred − target)²)

    ``eps_text`` = ε(x_t, template(c*)) is the only term carrying gradient. One t per image, uniform in
    [0, T) (np:965), shared by the three predictions. The true noise ε is not in the loss."""
    pred = guided_eps(eps_text, eps_safety, scale)
    target = cce_np_target(eps_uncond, eps_safety, scale)
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")


# --------------------------------------------------------------------------------------------- CCE: SLD
@dataclass
class CCESLDSettings:
    """Settings of CCE's SLD inversion (``sld/concept_inversion.py:409-414``; = SLD-Max of
    ``sld/generate_images.py:69-75``), named as CCE's arguments. The SLD formula itself is
    :func:`safegen_core.sld.sld_safety_term` (one implementation for sampling and inversion)."""
    guidance_scale: float = 7.5        # g,   sld:409
    sld_warmup_steps: int = 0          #      sld:410 (counted in TRAINING steps, see cce_sld_loss)
    sld_guidance_scale: float = 5000.  # s_S, sld:411
    sld_threshold: float = 1.0         # λ,   sld:412
    sld_momentum_scale: float = 0.5    # s_m, sld:413
    sld_mom_beta: float = 0.7          # β_m, sld:414

    def sld_params(self) -> sld_core.SLDParams:
        """The per-timestep SLD parameters; warm-up 0 — CCE's warm-up is applied per training step."""
        return sld_core.SLDParams(warmup_steps=0, guidance_scale=self.sld_guidance_scale,
                                  threshold=self.sld_threshold, momentum_scale=self.sld_momentum_scale,
                                  momentum_beta=self.sld_mom_beta)


def cce_sld_timesteps(g: torch.Generator, timestep_range: int = 90, timestep_count: int = 35,
                      num_train_timesteps: int = 1000) -> torch.Tensor:
    """The K DDPM timesteps of one CCE SLD sample (``sld/concept_inversion.py:985-1011``)::

        n  ~ U{range, …, T−1}                       # torch.randint(range, T)          (1004)
        ts = randperm(range)[:count] + (n − range)  # count distinct ints in [n−range, n)  (985-989, 1005)
        ts = sort(ts, descending=True)              # noisiest first, as in sampling   (1011)

    Defaults are train.sh's (90, 35; argparse 50, 13). Index ``sigmas[ts]`` for the k-diffusion σ."""
    if timestep_range < timestep_count:
        raise ValueError("Range size is less than the number of unique elements required.")
    n = int(torch.randint(timestep_range, num_train_timesteps, (1,), generator=g))
    ts = torch.randperm(timestep_range, generator=g)[:timestep_count] + (n - timestep_range)
    return torch.sort(ts, descending=True).values


def cce_sld_sample(latents: torch.Tensor, sigmas: torch.Tensor, g: torch.Generator, timestep_range: int = 90,
                   timestep_count: int = 35):
    """One CCE SLD training sample in k-diffusion terms: a random image, ONE noise ε, the K timesteps of
    :func:`cce_sld_timesteps` (descending) and x_k = x0 + σ_{t_k}·ε for each (sld:980, 1004-1011, 1040; CCE's
    DDPM x_t = √ᾱ·x_k). Batch size is 1, as CCE's ``timesteps.item()`` forces (sld:1005).
    Returns (x [K,C,H,W], sigma [K], eps [1,C,H,W], image index, t [K])."""
    n_img = latents.shape[0]
    idx = int(torch.randint(0, n_img, (1,), generator=g))
    x0 = latents[idx:idx + 1]
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    ts = cce_sld_timesteps(g, timestep_range, timestep_count, sigmas.shape[0])
    sigma = sigmas[ts].to(x0.dtype)
    x = x0 + eps * sigma.view(-1, *([1] * (x0.ndim - 1)))
    return x, sigma, eps, idx, ts


def cce_sld_step(eps_uncond: torch.Tensor, eps_safety: torch.Tensor, eps_text: torch.Tensor, k: int,
                 state: sld_core.SLDState, settings: CCESLDSettings = CCESLDSettings(),
                 apply_safety: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestep ``k`` of CCE's SLD guidance (``sld/concept_inversion.py:1062-1096``)::

        γ      = sld_safety_term(ε_∅, ε(c*), ε_S)     # Eq. 6/4/7 with the OLD momentum, then Eq. 8 updates it
        guide  = (ε(c*) − ε_∅) − γ   if apply_safety else  ε(c*) − ε_∅   (1063, 1088-1089)
        pred   = ε_∅ + g·guide                                            (1095)
        target = ε_∅ + g·(ε_S − ε_∅)                                      (1096, = cce_np_target)

    ``state`` carries the momentum over the sample's timesteps (one new index ``k`` per timestep, so it
    advances at each). The momentum is updated even when ``apply_safety`` is False (warm-up), as in the
    reference. Nothing is detached: γ depends on ε(c*) through β's clamp (|d|·s_S < 1) and the momentum
    keeps that graph, as CCE does (its UNet calls at every timestep run with grad, sld:1051). Elementwise on
    ε, hence convention-free (module docstring). Returns (pred, target)."""
    gamma = sld_core.sld_safety_term(eps_uncond, eps_text, eps_safety, k, settings.sld_params(), state)
    noise_guidance = eps_text - eps_uncond
    if apply_safety:
        noise_guidance = noise_guidance - gamma
    pred = eps_uncond + settings.guidance_scale * noise_guidance
    return pred, cce_np_target(eps_uncond, eps_safety, settings.guidance_scale)


def cce_sld_loss(eps_uncond_seq, eps_safety_seq, eps_text_seq, params: CCESLDSettings = CCESLDSettings(), *,
                 train_step: int = 0, timesteps=None) -> torch.Tensor:
    """CCE SLD loss for one sample (``sld/concept_inversion.py:1032-1098``).

    The ``*_seq`` are the K predictions at the sample's K timesteps, all at x_k = x0 + σ_{t_k}·ε with the
    SAME x0 and ε (one ``noise`` per sample, sld:980, 1040). They must be in the order CCE iterates —
    t descending (sld:1011) — or pass ``timesteps`` (one per entry) and they are sorted here. The momentum
    starts at zero for every sample (``safety_momentum = None``, sld:1032): it is carried across the K
    timesteps of one sample, never across samples or training steps. ``pred``/``target`` are overwritten at
    each k and the loss is the MSE at the LAST (smallest) timestep only (sld:1098, outside the loop); earlier
    timesteps act only through the momentum.

    Warm-up: CCE tests ``step >= sld_warmup_steps`` (sld:1088) where ``step`` is the *dataloader index in the
    current epoch* (sld:967) — the training micro-batch, not the timestep. Pass it as ``train_step``; with the
    default warm-up 0 the safety term is always on. (SLD's own pipeline warms up over denoising steps; CCE
    does not.)"""
    seqs = [list(eps_uncond_seq), list(eps_safety_seq), list(eps_text_seq)]
    if not (len(seqs[0]) == len(seqs[1]) == len(seqs[2]) > 0):
        raise ValueError("cce_sld_loss needs K ≥ 1 predictions of each kind")
    if timesteps is not None:
        ts = torch.as_tensor(timesteps).flatten()
        if ts.numel() != len(seqs[0]):
            raise ValueError("one timestep per prediction")
        order = torch.sort(ts, descending=True, stable=True).indices.tolist()
        seqs = [[s[i] for i in order] for s in seqs]
    apply_safety = train_step >= params.sld_warmup_steps
    state = sld_core.SLDState()  # safety_momentum = None per sample (sld:1032)
    pred = target = None
    for k, (eu, es, et) in enumerate(zip(*seqs)):
        pred, target = cce_sld_step(eu, es, et, k, state, params, apply_safety)
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")


# ------------------------------------------------------------------------------------------------ all
def inversion_loss(objective: str, eps, eps_cond, eps_neg=None, scale: float = 1.0, *, eps_uncond=None,
                   sld: CCESLDSettings | None = None, train_step: int = 0, timesteps=None) -> torch.Tensor:
    """The inversion loss of ``objective`` (``OBJECTIVES``). ``eps_cond`` = ε(x_t, c*) (carries the gradient),
    ``eps_neg`` = ε(x_t, negative/safety text), ``eps_uncond`` = ε(x_t, "") — needed by ``np`` and ``sld``.

    * ``ldm``:    mse(ε(c*), ε)                                   (CCE esd:980)
    * ``np``:     :func:`cce_np_loss` — ``eps`` unused             (CCE np:1004-1008)
    * ``sld``:    :func:`cce_sld_loss` — ``eps_cond``/``eps_neg``/``eps_uncond`` are sequences over the
      sample's timesteps (a single tensor = K = 1); ``scale`` overrides ``sld.guidance_scale``;
      ``eps`` unused.
    """
    if objective == "ldm":
        pred = eps_cond
    elif objective == "np":
        if eps_neg is None or eps_uncond is None:
            raise ValueError("objective 'np' needs the safety-text (eps_neg) and empty-prompt (eps_uncond) "
                             "predictions")
        return cce_np_loss(eps_uncond, eps_neg, eps_cond, scale)
    elif objective == "sld":
        if eps_neg is None or eps_uncond is None:
            raise ValueError("objective 'sld' needs the safety-text (eps_neg) and empty-prompt (eps_uncond) "
                             "predictions")
        params = CCESLDSettings(**{**(sld or CCESLDSettings()).__dict__, "guidance_scale": scale})
        seq = (lambda v: [v] if isinstance(v, torch.Tensor) else list(v))
        return cce_sld_loss(seq(eps_uncond), seq(eps_neg), seq(eps_cond), params, train_step=train_step,
                            timesteps=timesteps)
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


_ENC_KEYS = {"clip_l": "l", "l": "l", "clip_g": "g", "g": "g"}
_WIDTH_ENC = {768: "l", 1280: "g"}


def _as_vectors(t, name: str, key: str) -> torch.Tensor:
    """A stored embedding tensor as [n, width]: [width] is one vector; n ≥ 1; floating point."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: '{key}' is a {type(t).__name__}, expected a tensor [n, width]")
    if not t.is_floating_point():
        raise ValueError(f"{name}: '{key}' has dtype {str(t.dtype).replace('torch.', '')}; embedding vectors "
                         f"must be floating point")
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2:
        raise ValueError(f"{name}: '{key}' has shape {tuple(t.shape)}; expected [n, width] (or [width])")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: '{key}' has shape {tuple(t.shape)}: no vectors")
    return t


def from_file_object(obj, name: str = "<embedding>", widths: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Map an embedding file's content to encoder keys ('l', 'g'), accepting what ComfyUI's own
    ``load_embed`` (comfy/sd1_clip.py) loads: A1111 ``{"string_to_param": {"*": T}, "name", "step", …}``,
    A1111 safetensors ``{"emb_params": T}``, ComfyUI/kohya SDXL ``{"clip_l": T, "clip_g": T}``,
    diffusers ``{token: T}``, a bare tensor, and the old list-of-dicts format. Anything it cannot attribute,
    or tensors it would ignore, is an error naming ``name`` (the file, with extension) and the keys."""
    if isinstance(obj, torch.Tensor):
        t = _as_vectors(obj, name, "<tensor>")
        return {_WIDTH_ENC.get(t.shape[-1], "?"): t}
    if isinstance(obj, (list, tuple)):  # old format: [{key: tensor}, …], concatenated per width
        parts: dict[str, list] = {}
        for i, d in enumerate(obj):
            if not isinstance(d, dict):
                raise ValueError(f"{name}: list entry {i} is a {type(d).__name__}, expected a dict of tensors")
            for k, v in d.items():
                t = _as_vectors(v, name, f"[{i}].{k}")
                parts.setdefault(_WIDTH_ENC.get(t.shape[-1], "?"), []).append(t.reshape(-1, t.shape[-1]))
        if not parts:
            raise ValueError(f"{name}: holds no tensors")
        return {k: torch.cat(v) for k, v in parts.items()}
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: holds a {type(obj).__name__}, expected an embedding (dict of tensors)")
    if "string_to_param" in obj:  # A1111 textual inversion .pt
        sp = obj["string_to_param"]
        vals = list(sp.values()) if isinstance(sp, dict) else []
        if len(vals) != 1:
            raise ValueError(f"{name}: 'string_to_param' must hold one tensor, found {len(vals)}")
        t = _as_vectors(vals[0], name, "string_to_param")
        return {_WIDTH_ENC.get(t.shape[-1], "?"): t}
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{name}: holds no tensors (keys: {', '.join(map(str, list(obj)[:8]))})")
    enc = {k: v for k, v in tensors.items() if k in _ENC_KEYS}
    if enc:
        junk = sorted(set(tensors) - set(enc))
        if junk:
            raise ValueError(f"{name}: tensors beside {', '.join(sorted(enc))} that no text encoder would use: "
                             f"{', '.join(junk[:8])}")
        return {_ENC_KEYS[k]: _as_vectors(v, name, k) for k, v in enc.items()}
    if len(tensors) != 1:
        raise ValueError(f"{name}: cannot tell which tensor is the embedding (keys: {', '.join(list(tensors)[:8])}); "
                         f"expected one tensor, or clip_l/clip_g")
    (k, v), = tensors.items()
    t = _as_vectors(v, name, k)
    return {_WIDTH_ENC.get(t.shape[-1], "?"): t}


PACK_PREFIX = "safegen-ine:v1:"


def pack_embedding(vectors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """The vectors (and string metadata: base-model hash, source file, …) as one printable string that a
    workflow can carry: ``safegen-ine:v1:`` + base64 of a safetensors file. A few KB per vector set."""
    import base64

    from safetensors.torch import save
    meta = {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}
    blob = save(to_file_tensors(vectors), metadata=meta)
    return PACK_PREFIX + base64.b64encode(blob).decode("ascii")


def unpack_embedding(text: str, name: str = "embedded INE") -> tuple[dict[str, torch.Tensor], dict]:
    """(vectors, metadata) of :func:`pack_embedding`'s string; anything else is an error naming ``name``."""
    import base64
    import binascii

    from safetensors import SafetensorError
    from safetensors.torch import load
    s = (text or "").strip()
    if not s.startswith(PACK_PREFIX):
        raise ValueError(f"{name}: not an embedded INE (expected text starting with '{PACK_PREFIX}'; use the "
                         f"node's embed_in_workflow switch to make one)")
    try:
        blob = base64.b64decode(s[len(PACK_PREFIX):], validate=True)
        tensors = load(blob)
    except (binascii.Error, ValueError, SafetensorError) as e:
        raise ValueError(f"{name}: the embedded vectors are damaged ({type(e).__name__}: {e})") from e
    import json
    import struct
    n = struct.unpack("<Q", blob[:8])[0]
    meta = json.loads(blob[8:8 + n]).get("__metadata__", {}) or {}
    return from_file_object(tensors, name), meta


def check_embedding(vectors: dict[str, torch.Tensor], widths: dict[str, int], name: str) -> None:
    """Raise a clear error on a width mismatch, a missing encoder or NaN/inf values."""
    for enc, w in widths.items():
        if enc not in vectors:
            have = {k: tuple(v.shape) for k, v in vectors.items()}
            raise ValueError(f"{name}: no vectors for text encoder clip_{enc} (width {w}); file has {have}. "
                             f"Was it made for another model family (SD1.x vs SDXL)?")
        v = vectors[enc]
        if v.ndim != 2 or v.shape[0] == 0:
            raise ValueError(f"{name}: clip_{enc} vectors have shape {tuple(v.shape)}; expected [n ≥ 1, {w}]")
        if v.shape[-1] != w:
            raise ValueError(f"{name}: clip_{enc} vectors have width {v.shape[-1]}, the CLIP expects {w} "
                             f"(SD1.x/CLIP-L 768, SDXL CLIP-G 1280)")
        if not v.is_floating_point():
            raise ValueError(f"{name}: clip_{enc} vectors have dtype {v.dtype}; expected floating point")
        if not is_finite(v):
            raise ValueError(f"{name}: clip_{enc} vectors contain NaN or inf")
    extra = sorted(set(vectors) - set(widths))
    if extra:
        have = {k: tuple(v.shape) for k, v in vectors.items()}
        what = ", ".join("clip_" + e if e != "?" else "an unknown encoder" for e in extra)
        raise ValueError(f"{name}: vectors for {what} that this CLIP has no encoder for ({have}); made for "
                         f"another model family?")
