"""ESD — Erasing Concepts from Diffusion Models (Gandikota et al. 2023), comfy-free.

Objective (rohitgandikota/erasing): fine-tune a subset θ of the UNet so that its conditional
prediction for the concept c is the *negatively guided* prediction of the frozen original θ0::

    ε*(x_t, t) = ε_θ0(x_t, ∅, t) − η · (ε_θ0(x_t, c, t) − ε_θ0(x_t, ∅, t))
    L          = ‖ε_θ(x_t, c, t) − ε*(x_t, t)‖²        (mean squared error)

x_t is not a noised data sample: it is obtained by *partially sampling* from pure noise with
classifier-free guidance (scale ``start_guidance``) conditioned on c. There are two references,
one per ``xt_sampler`` (commits, line numbers and the differences: docs/esd.md):

* ``"erased"``   — CompVis ``train-scripts/train-esd.py`` (commit b8aeab6): x_t sampled by the
  model being trained with ldm's DDIM (50 steps, grid 1, 21, …, 981), the loss timestep is the
  DDPM step jittered uniformly inside the DDIM bin of the drawn index (see
  :func:`compvis_timestep`, :func:`compvis_steps_run`); ESD-u = ``noxattn``: every *parameter*
  (norms included) except ``out.*``, ``*time_embed*`` and ``*attn2*``.
* ``"original"`` — diffusers ``esd_sd.py`` (commit ce8d4d9): x_t sampled by the frozen base with
  SD-1.4's default PNDM/PLMS scheduler (50 steps, timesteps 981, 961, 961, 941, …, 1), loss at
  the timestep the sample has reached; ESD-u = ``esd-u``: every Linear/Conv2d *module* not
  named ``*attn2*`` (no norms; time embedding, conv_in and the final conv included).

:data:`REFERENCE_DEFAULTS` holds each reference's defaults. The schedules, the timestep draw and
the parameter selection follow the reference when :func:`make_esd_loss_fn` gets ``train_sigmas``
and :func:`select_parameters` gets ``reference``; without them the historical behaviour is kept
(k uniform over an evenly spaced N-step schedule, x_t and the loss at the same σ; the esd_sd.py
selection, which the historical one equals on ldm names).

η convention: the formula above is the paper's (CompVis script, η default 1). The newer
``esd_sd.py`` writes the target as ε_θ0(c) − η'(ε_θ0(c) − ε_θ0(∅)), i.e. η' = η + 1 (its default
η' = 2 is η = 1 here).

Everything works in k-diffusion terms (x = x0 + σ·ε, the convention of ComfyUI's samplers):
DDIM with η_DDIM = 0 is exactly an Euler step of the probability-flow ODE in σ,
x ← x + (σ_next − σ)·ε̂ (PNDM's transfer step is the same map). A latent z of ldm/diffusers
(variance preserving) at training step t is x = z·√(1+σ_t²) here. The model is reached through a
callable ``eps_fn(x, sigma, cond, erased) -> ε`` where ``erased`` selects the weights being
trained (True) or the frozen originals (False), so this module needs no ComfyUI import and the
same code is unit-tested on a tiny torch module.

A *condition* (``Cond``) is a tuple ``(cross_attn [B|1, L, D], pooled [B|1, P] or None)``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

VARIANTS = ("x", "u", "x-strict")
XT_SAMPLERS = ("erased", "original")
TRAINABLE_TYPES = (torch.nn.Linear, torch.nn.Conv2d)
# esd_sd.py L28: ``module.__class__.__name__ in [...]`` (ComfyUI's comfy.ops classes are named Linear/Conv2d too)
ESD_SD_MODULE_CLASSES = ("Linear", "Conv2d", "LoRACompatibleLinear", "LoRACompatibleConv")

Cond = tuple  # (cross_attn tensor, pooled tensor or None)
EpsFn = Callable[[torch.Tensor, torch.Tensor, Cond, bool], torch.Tensor]

# Defaults of each reference, η in *our* convention (ε∅ − η(εc − ε∅)). Line numbers: the file at the
# commit named in "source"; the reference lines are listed in docs/esd.md.
REFERENCE_DEFAULTS = {
    "erased": {  # CompVis script: x_t sampled by the model being trained
        "source": "rohitgandikota/erasing train-scripts/train-esd.py @ b8aeab6d4b6b613b88ad0bf219e3697c79003838",
        "steps": 1000,           # L299 --iterations default=1000
        "lr": 1e-5,              # L300 --lr default=1e-5 (declared type=int: only the default is usable)
        "eta": 1.0,              # L298 --negative_guidance default=1; L247 target e_0 - ng*(e_p - e_0) -> η = ng
        "start_guidance": 3.0,   # L297 --start_guidance default=3
        "sampling_steps": 50,    # L307 --ddim_steps default=50; L105 ddim_steps=50
        "ddim_eta": 0.0,         # L158 ddim_eta = 0
        "resolution": 512,       # L306 --image_size default=512 (L233 start_code hard-coded (1, 4, 64, 64))
        "batch_size": 1,         # L233
        "optimizer": "adam",     # L210 torch.optim.Adam(parameters, lr=lr)
        "loss": "mse",           # L211 torch.nn.MSELoss()
        "sampler": "ddim",       # L12/L98-101 ldm DDIMSampler, uniform grid 1, 21, ..., 981; L40-65 t_start=-1
        "xt_model": "erased",    # L205-207 quick_sample_till_t samples with `model` (the one being trained)
        "timestep_draw": "ddim-bin-jitter",  # L226-231 (compvis_timestep)
        "dtype": "float32",      # L22-37 full-precision checkpoint, no autocast
        "train_method": None,    # L296 required=True; x -> 'xattn', u -> 'noxattn' (L167-182)
    },
    "original": {  # diffusers esd_sd.py: x_t sampled by the frozen base
        "source": "rohitgandikota/erasing esd_sd.py (+ utils/sd_utils.py) @ ce8d4d925b25f2566fb59458e056af34cd5534d3",
        "steps": 200,            # L60 --iterations default=200
        "lr": 5e-5,              # L61 --lr default=5e-5
        "eta": 1.0,              # L62 --negative_guidance default=2 = η+1; L191 e_c - ng*(e_c - e_0)
        "start_guidance": 3.0,   # L57 --guidance_scale default=3
        "sampling_steps": 50,    # L56 --num_inference_steps default=50
        "ddim_eta": 0.0,         # sd_utils.py L51 eta=0.0 (unused by PNDM)
        "resolution": 1024,      # L78 height=width=1024 (hard-coded, although the model is SD-1.4)
        "batch_size": 1,         # L77 batchsize = 1
        "optimizer": "adam",     # L92 torch.optim.Adam(esd_params, lr=lr)
        "loss": "mse",           # L85 torch.nn.MSELoss()
        "sampler": "pndm",       # L20/L89 SD-1.4's default scheduler: PNDM, skip_prk_steps, steps_offset=1, leading
        "xt_model": "original",  # L127 pipe.unet = base_unet before sampling
        "timestep_draw": "schedule-index",  # L128-129 k = randint(0, n-1), t = scheduler.timesteps[k]
        "dtype": "bfloat16",     # L83 torch_dtype = torch.bfloat16
        "train_method": None,    # L59 required=True; 'esd-x', 'esd-u', 'esd-all', 'esd-x-strict' (L29-44)
    },
}


# ------------------------------------------------------------------------------ parameters
def check_variant(variant: str) -> str:
    """Normalise ``'esd-x'``/``'x'``… to one of :data:`VARIANTS`; raise naming a bad value."""
    v = str(variant).strip().lower()
    if v.startswith("esd-"):
        v = v[4:]
    if v not in VARIANTS:
        raise ValueError(f"unknown ESD variant {variant!r}; one of {', '.join(VARIANTS)}")
    return v


def check_xt_sampler(xt_sampler: str) -> str:
    """``xt_sampler`` if it is one of :data:`XT_SAMPLERS`; raise naming a bad value."""
    if xt_sampler not in XT_SAMPLERS:
        raise ValueError(f"unknown xt_sampler {xt_sampler!r}; one of {XT_SAMPLERS}")
    return xt_sampler


def check_reference(reference: str | None) -> str:
    """The reference whose selection rule applies: ``None`` is the historical rule, which is
    esd_sd.py's (``"original"``); otherwise one of :data:`XT_SAMPLERS`."""
    return "original" if reference is None else check_xt_sampler(reference)


def compvis_selects(name: str, train_method: str) -> bool:
    """train-esd.py L165-201, transcribed: does ``train_method`` train the UNet *parameter* ``name``
    (a ``model.model.diffusion_model.named_parameters()`` name = ComfyUI's UNet name)?"""
    if train_method == "noxattn":    # L167-172 "train all layers except x-attns and time_embed layers"
        return not (name.startswith("out.") or "attn2" in name or "time_embed" in name)
    if train_method == "selfattn":   # L174-177
        return "attn1" in name
    if train_method == "xattn":      # L179-182
        return "attn2" in name
    if train_method == "full":       # L184-186
        return True
    if train_method == "notime":     # L188-191
        return not (name.startswith("out.") or "time_embed" in name)
    if train_method == "xlayer":     # L192-196
        return "attn2" in name and ("output_blocks.6." in name or "output_blocks.8." in name)
    if train_method == "selflayer":  # L197-201
        return "attn1" in name and ("input_blocks.4." in name or "input_blocks.7." in name)
    return False                     # unknown methods select nothing (the script then trains nothing)


def esd_sd_selects(module_name: str, module: torch.nn.Module, train_method: str) -> bool:
    """esd_sd.py L24-47, transcribed: does ``train_method`` train (all parameters of) this module?"""
    if not (type(module).__name__ in ESD_SD_MODULE_CLASSES or isinstance(module, TRAINABLE_TYPES)):
        return False                 # L28 (isinstance added for Linear/Conv2d subclasses of other names)
    if train_method == "esd-x":      # L29
        return "attn2" in module_name
    if train_method == "esd-u":      # L34
        return "attn2" not in module_name
    if train_method == "esd-all":    # L39
        return True
    if train_method == "esd-x-strict":  # L44
        return "attn2.to_k" in module_name or "attn2.to_v" in module_name
    return False


# our variant -> the reference's train_method. CompVis has no x-strict: esd_sd.py's rule is used for it
# under both references (on ldm names it is the attn2.to_k / attn2.to_v weights either way).
TRAIN_METHODS = {"erased": {"x": "xattn", "u": "noxattn", "x-strict": "esd-x-strict"},
                 "original": {"x": "esd-x", "u": "esd-u", "x-strict": "esd-x-strict"}}


def select_parameters(module: torch.nn.Module, variant: str, reference: str | None = None) -> list[str]:
    """Names (as in ``module.named_parameters()``/``state_dict()``) of the tensors that train.

    ``reference`` (an ``xt_sampler``): ``"erased"`` selects like CompVis train-esd.py (by parameter
    name over all parameters: ESD-u trains norms, skips ``out.*``/``time_embed*``); ``"original"``
    and ``None`` like esd_sd.py (Linear/Conv2d modules by module name, never norms). Module names
    are ComfyUI's = CompVis ldm's (``input_blocks.*``, ``middle_block.*``, ``output_blocks.*``,
    ``time_embed.*``, ``out.*``).

    Raises ValueError naming the variant when it selects nothing (e.g. a model without
    cross-attention for ``x``)."""
    v = check_variant(variant)
    ref = check_reference(reference)
    method = TRAIN_METHODS[ref][v]
    names = []
    if method in ("xattn", "noxattn"):
        names = [n for n, p in module.named_parameters() if p is not None and compvis_selects(n, method)]
    else:
        for mname, m in module.named_modules():
            if not mname or not esd_sd_selects(mname, m, method):
                continue
            for pname, p in m.named_parameters(recurse=False):
                if p is not None:
                    names.append(f"{mname}.{pname}")
    if not names:
        raise ValueError(f"ESD variant {variant!r} selects no parameters of this {type(module).__name__} "
                         f"(reference {ref!r}, train_method {method!r} matches nothing)")
    return names


def replacement_and_patch(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]):
    """(replacement tensors for the file, differences for ModelPatcher ``diff`` patches).

    The file holds θ0 + Δ in the base weights' dtype (what the Unlearned UNet Loader copies in at
    strength 1). For float32 weights the patch is Δ itself: ComfyUI computes θ0 + 1.0·Δ in
    float32, bit-identical to the stored replacement. For half-precision weights the patch is the
    difference to the *rounded* replacement, so both paths land on the same representable value.
    """
    targets, patches = {}, {}
    for k, d in deltas.items():
        b = base[k]
        t = (b.float() + d.detach().float().to(b.device)).to(b.dtype)
        targets[k] = t.detach().cpu().contiguous()
        patches[k] = d.detach().float() if b.dtype == torch.float32 else (t.float() - b.float())
        if not bool(torch.isfinite(targets[k]).all()):
            raise FloatingPointError(f"trained tensor {k} holds NaN/inf; lower the learning rate")
    return targets, patches


# ------------------------------------------------------------------------------ conditions
def _lcm_repeat(t: torch.Tensor, length: int) -> torch.Tensor:
    return t if t.shape[1] == length else t.repeat(1, length // t.shape[1], 1)


def cat_conds(conds, batch_sizes=None) -> Cond:
    """Concatenate conditions along the batch; token lengths are repeated to their LCM (as
    ComfyUI does when batching conds of different chunk counts). ``batch_sizes[i]`` expands a
    batch-1 condition to that many rows."""
    conds = list(conds)
    sizes = batch_sizes or [c[0].shape[0] for c in conds]
    length = 1
    for c, _ in conds:
        length = length * c.shape[1] // math.gcd(length, c.shape[1])
    xs, ps = [], []
    for (c, p), n in zip(conds, sizes):
        xs.append(_lcm_repeat(c, length).expand(n, -1, -1) if c.shape[0] == 1 else _lcm_repeat(c, length))
        if p is not None:
            ps.append(p.expand(n, -1) if p.shape[0] == 1 else p)
    pooled = torch.cat(ps) if len(ps) == len(conds) else None
    return torch.cat(xs), pooled


# ------------------------------------------------------------------------------ schedule / sampling
def ddim_sigmas(train_sigmas: torch.Tensor, n: int) -> torch.Tensor:
    """σ of an N-step sampling schedule, descending (first = σ_max): N timesteps evenly spaced
    over the model's training timesteps (``train_sigmas`` ascending, one per timestep)."""
    if n < 1:
        raise ValueError(f"sampling steps must be ≥ 1, got {n}")
    T = train_sigmas.shape[0]
    idx = torch.linspace(T - 1, 0, n).round().long()
    return train_sigmas.float()[idx]


def start_noise(noise: torch.Tensor, sigma_max: torch.Tensor) -> torch.Tensor:
    """x_T for a variance-preserving model in k-diffusion space: ε·√(1+σ_max²) (ComfyUI's
    ``noise_scaling`` for a full denoise)."""
    return noise * torch.sqrt(1.0 + sigma_max.float() ** 2)


def guided(eps_null: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_null + scale * (eps_cond - eps_null)


@torch.no_grad()
def sample_until(eps_fn: EpsFn, noise: torch.Tensor, sigmas: torch.Tensor, k: int, cond: Cond, null: Cond,
                 guidance: float, erased: bool) -> torch.Tensor:
    """x at ``sigmas[k]`` after k guided DDIM (η=0) steps from pure noise. Rows of ``noise`` pair
    with rows of ``cond`` (or a batch-1 cond for all rows)."""
    b = noise.shape[0]
    x = start_noise(noise, sigmas[0])
    both = cat_conds([null, cond], [b, b])
    for i in range(int(k)):
        s = sigmas[i].expand(2 * b)
        e = eps_fn(torch.cat([x, x]), s, both, erased)
        e_null, e_cond = e.chunk(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * guided(e_null, e_cond, guidance)
    return x


# ------------------------------------------------------------------------------ reference schedules
def check_train_sigmas(train_sigmas: torch.Tensor) -> torch.Tensor:
    """The model's 1000 training σ (ascending, σ_t of DDPM step t) as float64; both references
    hard-code a 1000-step DDPM."""
    if train_sigmas.ndim != 1 or train_sigmas.shape[0] != 1000:
        raise ValueError(f"the ESD references need the 1000 training sigmas of a DDPM model, got shape "
                         f"{tuple(train_sigmas.shape)}")
    return train_sigmas.detach().double().cpu()


def rescale_latent(x: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
    """The same variance-preserving latent z = x/√(1+σ_from²), expressed at σ_to: what handing ldm's
    ``apply_model`` the sample z together with a different timestep amounts to in σ terms."""
    f = torch.sqrt((1.0 + torch.as_tensor(sigma_to, dtype=torch.float64) ** 2)
                   / (1.0 + torch.as_tensor(sigma_from, dtype=torch.float64) ** 2))
    return x * f.to(x.dtype)


def ldm_ddim_timesteps(n: int, num_train: int = 1000) -> list[int]:
    """ldm ``make_ddim_timesteps('uniform', n, 1000)``: ``range(0, 1000, 1000 // n)`` + 1 (ascending;
    1, 21, …, 981 for n = 50)."""
    if not 1 <= n <= num_train:
        raise ValueError(f"sampling steps must be in 1..{num_train}, got {n}")
    return [t + 1 for t in range(0, num_train, num_train // n)]


def compvis_chain(n: int) -> list[int]:
    """Training steps the CompVis DDIM sampler visits, x_T first. ``sample_model`` passes
    ``t_start=-1`` so ``timesteps[:t_start]`` drops the top step: x_T (the start noise) enters at
    grid[-2] (961), each step at index i goes to ``alphas_prev[i]`` = grid[i-1] (ᾱ_0 for i = 0)."""
    grid = ldm_ddim_timesteps(n)
    return grid[:-1][::-1] + [0]


def compvis_steps_run(k: int, n: int) -> int:
    """DDIM steps ``quick_sample_till_t(..., t=k)`` runs (ddim.py: ``index = total_steps - i - 1``,
    ``break`` after the step where ``index + 1 == till_T``; ``till_T = 0`` never breaks). x_t is at
    ``compvis_chain(n)[steps]``. k = 0 and k = 1 both run the full chain."""
    total = len(ldm_ddim_timesteps(n)) - 1
    last_index = k - 1 if 1 <= k <= total else 0
    return total - last_index


def compvis_timestep(k: int, n: int, g: torch.Generator) -> int:
    """The DDPM step the CompVis loss uses for DDIM draw k (train-esd.py L228-231)::

        og_num = round((int(t_enc)/ddim_steps)*1000)
        og_num_lim = round((int(t_enc+1)/ddim_steps)*1000)
        t_enc_ddpm = torch.randint(og_num, og_num_lim, (1,))

    i.e. uniform in the k-th bin [1000k/N, 1000(k+1)/N) — counted from t = 0 while the sample
    after :func:`compvis_steps_run` (k) sits near t = 1000(k-2)/N + 1: the reference's own pairing."""
    og_num = round((int(k) / n) * 1000)
    og_num_lim = round((int(k + 1) / n) * 1000)
    return int(torch.randint(og_num, og_num_lim, (1,), generator=g))


def pndm_timesteps(n: int, num_train: int = 1000, steps_offset: int = 1) -> list[int]:
    """SD-1.4's PNDM scheduler (skip_prk_steps, ``leading`` spacing, steps_offset 1) ``.timesteps``:
    981, 961, 961, 941, …, 21, 1 for n = 50 (n + 1 entries; the repeated step is PLMS's warm-up)."""
    if not 1 <= n <= num_train:
        raise ValueError(f"sampling steps must be in 1..{num_train}, got {n}")
    ts = [i * (num_train // n) + steps_offset for i in range(n)]
    return (ts[:-1] + ts[-2:-1] + ts[-1:])[::-1]


def _guided_eps(eps_fn: EpsFn, x, sigma, cond: Cond, null: Cond, guidance: float, erased: bool):
    b = x.shape[0]
    e = eps_fn(torch.cat([x, x]), sigma.expand(2 * b), cat_conds([null, cond], [b, b]), erased)
    e_null, e_cond = e.chunk(2)
    return guided(e_null, e_cond, guidance)


@torch.no_grad()
def sample_plms_until(eps_fn: EpsFn, noise: torch.Tensor, train_sigmas: torch.Tensor, n: int, k: int, cond: Cond,
                      null: Cond, guidance: float, erased: bool) -> torch.Tensor:
    """x after the first k entries of :func:`pndm_timesteps` (n), guided, with diffusers'
    ``PNDMScheduler.step_plms`` (esd_sd.py → sd_utils.py L209 ``timesteps[0:run_till_timestep]``).
    PNDM's transfer step is DDIM's, i.e. x ← x + (σ_prev − σ_t)·ε' in σ terms; ε' is the
    linear-multistep combination; ``prev_timestep < 0`` uses ᾱ_0 (set_alpha_to_one False).
    The result is at σ of ``pndm_timesteps(n)[k]``."""
    sig = check_train_sigmas(train_sigmas)
    ts = pndm_timesteps(n)
    ratio = 1000 // n
    s = lambda t: sig[t] if t >= 0 else sig[0]  # noqa: E731
    x = start_noise(noise, s(ts[0]).float())
    ets, cur = [], None
    for i in range(int(k)):
        t = ts[i]
        e = _guided_eps(eps_fn, x, s(t).float(), cond, null, guidance, erased)
        prev_t, tt = t - ratio, t
        if i != 1:
            ets = ets[-3:] + [e]
        else:
            prev_t, tt = t, t + ratio
        if len(ets) == 1 and i == 0:
            eps, cur = e, x
        elif len(ets) == 1 and i == 1:
            eps, x, cur = (e + ets[-1]) / 2, cur, None
        elif len(ets) == 2:
            eps = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            eps = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            eps = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        x = x + (s(prev_t) - s(tt)).to(x.dtype) * eps
    return x


def draw_reference_point(g: torch.Generator, n_steps: int, latent_shape, xt_sampler: str) -> tuple[int, int, torch.Tensor]:
    """One training point's randomness under ``xt_sampler``'s reference: (draw k ∈ [0, N), the DDPM
    step of the loss, start noise), drawn from ``g`` in the reference's order.

    * ``"erased"``: k (L226), then t = :func:`compvis_timestep` (L228-231), then the noise (L233).
    * ``"original"``: k (L128), t = ``pndm_timesteps(N)[k]`` (L129, no draw), then the noise."""
    check_xt_sampler(xt_sampler)
    k = int(torch.randint(0, n_steps, (1,), generator=g))
    t = compvis_timestep(k, n_steps, g) if xt_sampler == "erased" else pndm_timesteps(n_steps)[k]
    return k, t, torch.randn(tuple(latent_shape), generator=g)


# ------------------------------------------------------------------------------ objective
def esd_target(eps_null: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ε* = ε0(∅) − η(ε0(c) − ε0(∅))."""
    return eps_null - float(eta) * (eps_concept - eps_null)


def esd_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(pred.float(), target.float())


@torch.no_grad()
def frozen_target(eps_fn: EpsFn, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, null: Cond,
                  eta: float) -> torch.Tensor:
    """ε* at (x, σ) from the frozen model (one batched call for ∅ and c)."""
    b = x.shape[0]
    e = eps_fn(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_conds([null, cond], [b, b]), False)
    e_null, e_c = e.chunk(2)
    return esd_target(e_null, e_c, eta)


def draw_point(g: torch.Generator, n_steps: int, latent_shape) -> tuple[int, torch.Tensor]:
    """One training point's randomness (historical draw, no reference): the step k ∈ [0, N) and the
    start noise. The references' draws: :func:`draw_reference_point`."""
    k = int(torch.randint(0, n_steps, (1,), generator=g))
    return k, torch.randn(tuple(latent_shape), generator=g)


def make_esd_loss_fn(eps_fn: EpsFn, concept: Cond, null: Cond, sigmas: torch.Tensor, latent_shape,
                     eta: float = 1.0, start_guidance: float = 3.0, xt_sampler: str = "erased",
                     train_sigmas: torch.Tensor | None = None):
    """``loss_fn(step, generator)`` for :func:`safegen_core.training.train` (ESD objective).

    ``latent_shape``: [1, C, h, w]. Without ``train_sigmas`` (historical): ``sigmas`` is the N-step
    schedule from :func:`ddim_sigmas`, k uniform, x_t and the loss at ``sigmas[k]``. With
    ``train_sigmas`` (the model's 1000 training σ) the ``xt_sampler``'s reference is followed with
    N = ``len(sigmas)`` (only the length of ``sigmas`` is used):

    * ``"erased"`` (CompVis): x_t after :func:`compvis_steps_run` (k) DDIM steps of the model being
      trained along :func:`compvis_chain`; loss at the jittered DDPM step t of
      :func:`compvis_timestep`, on the same VP latent (:func:`rescale_latent` to σ_t).
    * ``"original"`` (esd_sd.py): x_t after k PLMS steps of the frozen model
      (:func:`sample_plms_until`); loss at ``pndm_timesteps(N)[k]``, where x_t is.

    ``loss_fn.last`` holds the last step's (k, σ of the loss) for reporting, ``loss_fn.last_point``
    a dict with k, the loss step t (reference mode), σ of x_t and of the loss."""
    check_xt_sampler(xt_sampler)
    n = sigmas.shape[0]
    erased = xt_sampler == "erased"
    sig = None if train_sigmas is None else check_train_sigmas(train_sigmas)
    if sig is not None and erased:
        chain_sig = sig[compvis_chain(n)].float()

    def loss_fn(step, g):
        if sig is None:
            k, noise = draw_point(g, n, latent_shape)
            x = sample_until(eps_fn, noise, sigmas, k, concept, null, start_guidance, erased)
            t, sigma_x = None, sigmas[k]
            sigma = sigmas[k].expand(x.shape[0])
        else:
            k, t, noise = draw_reference_point(g, n, latent_shape, xt_sampler)
            if erased:
                steps = compvis_steps_run(k, n)
                x = sample_until(eps_fn, noise, chain_sig, steps, concept, null, start_guidance, True)
                sigma_x = chain_sig[steps]
                x = rescale_latent(x, sigma_x, sig[t])
            else:
                x = sample_plms_until(eps_fn, noise, sig, n, k, concept, null, start_guidance, False)
                sigma_x = sig[t].float()
            sigma = sig[t].float().expand(x.shape[0])
        target = frozen_target(eps_fn, x, sigma, concept, null, eta)
        pred = eps_fn(x, sigma, cat_conds([concept], [x.shape[0]]), True)
        loss_fn.last = (k, float(sigma[0]))
        loss_fn.last_point = {"k": k, "t": t, "sigma_x": float(sigma_x), "sigma": float(sigma[0])}
        return esd_loss(pred, target)

    loss_fn.last = (None, None)
    loss_fn.last_point = None
    return loss_fn


@torch.no_grad()
def eval_points(eps_fn: EpsFn, concept: Cond, null: Cond, sigmas: torch.Tensor, latent_shape, n_points: int,
                seed: int, start_guidance: float = 3.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation points (x_t, σ): partial samples of the *frozen* model conditioned on the
    concept, k spread over the schedule — independent of the weights being trained, so a
    before/after comparison is paired."""
    g = torch.Generator().manual_seed(int(seed))
    out = []
    n = sigmas.shape[0]
    for i in range(n_points):
        k = (i * n) // max(1, n_points)
        noise = torch.randn(tuple(latent_shape), generator=g)
        x = sample_until(eps_fn, noise, sigmas, k, concept, null, start_guidance, False)
        out.append((x, sigmas[k].expand(x.shape[0])))
    return out


@torch.no_grad()
def target_error(eps_fn: EpsFn, points, concept: Cond, null: Cond, eta: float, erased: bool) -> float:
    """Mean over ``points`` of MSE(ε(x, c), ε*(x)) — how far the (erased or original) concept
    prediction is from the ESD target."""
    errs = []
    for x, s in points:
        target = frozen_target(eps_fn, x, s, concept, null, eta)
        pred = eps_fn(x, s, cat_conds([concept], [x.shape[0]]), erased)
        errs.append(float(esd_loss(pred, target)))
    return sum(errs) / len(errs)


@torch.no_grad()
def relative_change(eps_fn: EpsFn, points, cond: Cond) -> float:
    """‖ε_θ(x, b) − ε_θ0(x, b)‖ / ‖ε_θ0(x, b)‖ over ``points`` (all rows stacked): how much a
    prompt's prediction moved."""
    num = den = 0.0
    for x, s in points:
        c = cat_conds([cond], [x.shape[0]])
        a, b = eps_fn(x, s, c, True).float(), eps_fn(x, s, c, False).float()
        num += float((a - b).pow(2).sum())
        den += float(b.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


# ------------------------------------------------------------------------------ sanity checks
NOTHING_TO_ERASE_TOL = 1e-3
"""Relative RMS of ε(c) − ε(∅) at or below which the concept is treated as indistinguishable from
the empty prompt: 0.1 % of the prediction's size, about twice float16's relative rounding
(2^-11 ≈ 4.9e-4) — what two identical conditions can differ by in a half-precision UNet — and far
below what a prompt that reaches the UNet changes (guidance works on that difference)."""


@torch.no_grad()
def concept_difference(eps_fn: EpsFn, concept: Cond, null: Cond, sigmas: torch.Tensor, latent_shape,
                       n_points: int = 4, seed: int = 0) -> float:
    """√(Σ‖ε0(x, c) − ε0(x, ∅)‖² / Σ‖ε0(x, ∅)‖²) of the frozen model over ``n_points`` fixed points:
    Gaussian latents of unit-variance data at σ = ``sigmas[i·N // n_points]`` (σ_max first), x =
    ε·√(1+σ²), one batched call (∅ and c) per point. 0 when the concept's prediction equals the
    empty prompt's — then ESD's target is ε0(∅) and there is nothing to erase."""
    g = torch.Generator().manual_seed(int(seed))
    n = sigmas.shape[0]
    num = den = 0.0
    for i in range(max(1, int(n_points))):
        s = sigmas[(i * n) // max(1, int(n_points))].float()
        x = torch.randn(tuple(latent_shape), generator=g) * torch.sqrt(1.0 + s ** 2)
        b = x.shape[0]
        e = eps_fn(torch.cat([x, x]), s.expand(2 * b), cat_conds([null, concept], [b, b]), False).float()
        e_null, e_c = e.chunk(2)
        num += float((e_c - e_null).pow(2).sum())
        den += float(e_null.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


def nothing_to_erase(value: float, tol: float = NOTHING_TO_ERASE_TOL) -> bool:
    """True when :func:`concept_difference` ``value`` is ≤ ``tol`` (or not a number): the concept does
    not change the prediction, so training would only fit ε(c) to ε(∅) (refuse or warn)."""
    return not (float(value) > float(tol))


def loss_rose(losses, frac: float = 0.25, rel_margin: float = 0.1, z: float = 2.5, min_len: int = 20):
    """A message (truthy ``str``) when the loss went *up* over the run, else ``False``.

    Windows of w = max(2, ⌈frac·n⌉) first and last losses; "rose" needs both
    mean_last > (1 + ``rel_margin``)·mean_first and mean_last − mean_first > ``z``·√(var_first/w +
    var_last/w) (Welch's standard error; ESD losses are noisy because every step draws its own t,
    so a bare comparison of means fires on flat runs). Fewer than ``min_len`` losses: False.
    A non-finite loss anywhere is reported as a rise. Quarter windows (``frac`` 0.25): ESD's per-step
    losses are so noisy (each step its own timestep) that 10% windows missed a 3× rise over a
    100-step world run (last-10% mean 0.050 vs 0.017, z ≈ 2.5); the Welch bound keeps flat runs quiet."""
    vals = [float(v) for v in losses]
    if any(not math.isfinite(v) for v in vals):
        return f"loss became non-finite ({sum(not math.isfinite(v) for v in vals)} of {len(vals)} steps)"
    n = len(vals)
    if n < max(int(min_len), 4):
        return False
    w = max(2, math.ceil(frac * n))
    first, last = vals[:w], vals[-w:]
    m0, m1 = sum(first) / w, sum(last) / w
    v0 = sum((v - m0) ** 2 for v in first) / (w - 1)
    v1 = sum((v - m1) ** 2 for v in last) / (w - 1)
    se = math.sqrt(v0 / w + v1 / w)
    if m1 > (1.0 + rel_margin) * m0 and (m1 - m0) > z * se:
        return (f"loss rose: mean of the last {w} steps {m1:.4g} > first {w} steps {m0:.4g} "
                f"(+{(m1 / m0 - 1) * 100 if m0 > 0 else float('inf'):.0f}%, {(m1 - m0) / max(se, 1e-30):.1f} s.e.)")
    return False
