"""The one training loop of the pack: concept inversion, erasure and text-encoder alignment.

Comfy-free. The caller supplies the trainable tensors and a loss function; the loop owns
the optimiser, per-step determinism, progress/interrupt/preview callbacks, checkpoints
(every N steps, keep the last K, written atomically) and resume.

Determinism: step ``i`` draws its randomness from ``torch.Generator().manual_seed(seed, i)``
(see :func:`step_generator`), so a run resumed from a checkpoint at step k follows exactly
the same path as an uninterrupted run: parameters, optimiser moments and the loss history
are restored from the checkpoint and steps k+1… use the same random draws.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .weights_io import WeightFileError, read_weight_file, save_safetensors_atomic

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 500
    lr: float = 5e-3
    seed: int = 0
    optimizer: str = "adamw"          # "adamw" | "adam" | "sgd"
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 0.0            # 0 = off
    grad_accum: int = 1               # micro-batches (loss_fn calls) per optimiser step
    checkpoint_every: int = 0         # 0 = no checkpoints
    keep_checkpoints: int = 2
    preview_every: int = 0            # 0 = no previews


@dataclass
class TrainCallbacks:
    on_step: Callable[[int, int, float], None] | None = None       # (step, total, loss)
    check_interrupt: Callable[[], None] | None = None               # raises to cancel
    on_preview: Callable[[int], None] | None = None                 # (step)


@dataclass
class TrainResult:
    params: dict[str, torch.Tensor]
    losses: list[float]
    steps_done: int
    resumed_from: int = 0
    checkpoints: list[str] = field(default_factory=list)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator that depends only on (seed, step): resume-safe randomness."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    opt = cfg.optimizer.lower()
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if opt == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if opt == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw, adam, sgd)")


# ---------------------------------------------------------------- checkpoints
CKPT_PREFIX = "step_"


def _ckpt_tensors(names, params, opt) -> dict[str, torch.Tensor]:
    out = {f"param/{n}": params[n].detach() for n in names}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach()
            out[f"opt/{idx}/{k}"] = t.reshape(1) if t.ndim == 0 else t
    return out


def save_checkpoint(ckpt_dir: str, step: int, names, params, opt, losses, fingerprint: dict,
                    keep: int) -> str:
    path = os.path.join(ckpt_dir, f"{CKPT_PREFIX}{step:07d}.safetensors")
    meta = {"step": str(step), "losses": json.dumps(losses), "fingerprint": json.dumps(fingerprint, sort_keys=True),
            "param_names": json.dumps(list(names)), "format": "safegen-train-checkpoint-1"}
    save_safetensors_atomic(_ckpt_tensors(names, params, opt), path, meta)
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        try:
            os.remove(old[1])
        except OSError:
            pass
    return path


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] sorted by the step stored in each file's metadata (not its name)."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for fn in os.listdir(ckpt_dir):
        if not fn.endswith(".safetensors") or fn.startswith("."):
            continue
        p = os.path.join(ckpt_dir, fn)
        try:
            meta = read_weight_file(p, lazy=True).metadata
            out.append((int(meta["step"]), p))
        except (WeightFileError, KeyError, ValueError):
            log.warning("ignoring unreadable checkpoint %s", p)
    return sorted(out)


def load_checkpoint(path: str, names, params, opt, fingerprint: dict) -> tuple[int, list[float]]:
    wf = read_weight_file(path)
    meta = wf.metadata
    saved_fp = json.loads(meta.get("fingerprint", "{}"))
    if saved_fp != json.loads(json.dumps(fingerprint, sort_keys=True)):
        diff = sorted(k for k in set(saved_fp) | set(fingerprint) if saved_fp.get(k) != fingerprint.get(k))
        raise WeightFileError(
            f"{os.path.basename(path)}: checkpoint was made with different settings ({', '.join(diff)}); "
            f"turn resume off or delete the checkpoint folder {os.path.dirname(path)}")
    with torch.no_grad():
        for n in names:
            params[n].copy_(wf.tensors[f"param/{n}"])
    sd = opt.state_dict()
    for idx in range(len(names)):
        st = {}
        for k in ("step", "exp_avg", "exp_avg_sq", "momentum_buffer"):
            key = f"opt/{idx}/{k}"
            if key in wf.tensors:
                t = wf.tensors[key]
                st[k] = t.reshape(()) if k == "step" else t.clone()
        if st:
            sd["state"][idx] = st
    opt.load_state_dict(sd)
    return int(meta["step"]), [float(x) for x in json.loads(meta.get("losses", "[]"))]


# ---------------------------------------------------------------- the loop
def train(params: dict[str, torch.Tensor], loss_fn: Callable[[int, torch.Generator], torch.Tensor],
          cfg: TrainConfig, callbacks: TrainCallbacks | None = None, ckpt_dir: str | None = None,
          resume: bool = False, fingerprint: dict | None = None) -> TrainResult:
    """Optimise ``params`` (leaf tensors, ``requires_grad`` set here) to minimise ``loss_fn``.

    ``loss_fn(step, generator)`` returns a scalar tensor; with ``cfg.grad_accum`` = n it is called n times
    per step (the same generator, drawn from in turn) and the gradients of the mean are accumulated
    (diffusers' ``gradient_accumulation_steps``); the recorded loss is that mean. Checkpoints go to ``ckpt_dir`` every
    ``cfg.checkpoint_every`` steps; with ``resume`` the newest compatible checkpoint is loaded.
    Raises whatever ``callbacks.check_interrupt`` raises (the caller cleans up in ``finally``).
    A NaN/inf loss stops the run with a clear error instead of corrupting the parameters.
    """
    cb = callbacks or TrainCallbacks()
    fp = dict(fingerprint or {})
    fp.setdefault("train", {k: v for k, v in asdict(cfg).items()
                            if k not in ("steps", "checkpoint_every", "keep_checkpoints", "preview_every")
                            and not (k == "grad_accum" and v == 1)})  # runs saved before it existed resume
    names = list(params)
    for n in names:
        params[n].requires_grad_(True)
    opt = make_optimizer([params[n] for n in names], cfg)
    start, losses, saved = 0, [], []
    if resume and ckpt_dir:
        ck = list_checkpoints(ckpt_dir)
        if ck:
            start, losses = load_checkpoint(ck[-1][1], names, params, opt, fp)
            log.info("resumed from %s (step %d)", ck[-1][1], start)
    for step in range(start + 1, cfg.steps + 1):
        if cb.check_interrupt:
            cb.check_interrupt()
        opt.zero_grad(set_to_none=True)
        g = step_generator(cfg.seed, step)  # the micro-batches draw from it in turn
        lv = 0.0
        for micro in range(max(1, int(cfg.grad_accum))):
            if micro and cb.check_interrupt:
                cb.check_interrupt()
            loss = loss_fn(step, g) / max(1, int(cfg.grad_accum))
            lm = float(loss.detach())
            if not math.isfinite(lm):
                raise FloatingPointError(f"loss became {lm} at step {step}; lower the learning rate")
            loss.backward()
            lv += lm
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([params[n] for n in names], cfg.grad_clip)
        opt.step()
        losses.append(lv)
        if cb.on_step:
            cb.on_step(step, cfg.steps, lv)
        if ckpt_dir and cfg.checkpoint_every > 0 and (step % cfg.checkpoint_every == 0):
            saved.append(save_checkpoint(ckpt_dir, step, names, params, opt, losses, fp, cfg.keep_checkpoints))
        if cb.on_preview and cfg.preview_every > 0 and (step % cfg.preview_every == 0 or step == cfg.steps):
            cb.on_preview(step)
    for n in names:
        params[n].requires_grad_(False)
    return TrainResult({n: params[n].detach().clone() for n in names}, losses, cfg.steps, start, saved)
