"""Training on ComfyUI models: a trainable clone of a ModelPatcher, weight deltas as weight
wrappers, and the one call into ``safegen_core.training.train`` with ComfyUI's progress,
interrupt and checkpoint folder.

How a trainer gets its model (see :func:`compat.trainable_clone`): a clone obtained the way core's
TrainLoraNode does in the running ComfyUI (0.12+: a fresh non-dynamic copy; 0.3.75: a clone
sharing the weights, aliased for autograd). Trained tensors are *deltas* added by
``ModelPatcher.add_weight_wrapper`` (``w + delta`` while enabled, ``w`` otherwise), so no copy of
the trained tensors is kept and the input MODEL/CLIP are never written. The clone is released in
``finally`` (also on cancel or error).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

import comfy.model_management as mm

from ..safegen_core.training import TrainCallbacks, TrainConfig, TrainResult, train
from . import compat
from . import common

log = logging.getLogger("safegen")

UNET_PREFIX = "diffusion_model."


class DeltaHooks:
    """``w + delta`` for each tensor named in ``deltas`` (keys relative to the patcher's model, e.g.
    ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`` or
    ``clip_l.transformer.text_model.encoder.layers.11.mlp.fc1.weight``) while ``enabled``; ``w``
    (the frozen original) otherwise. Installed with ``ModelPatcher.add_weight_wrapper`` before the
    patcher is loaded."""

    def __init__(self, patcher, deltas: dict[str, torch.Tensor]):
        self.deltas = deltas
        self.enabled = True
        self.calls = 0
        self._seen = 0
        self.functions = []
        for key, d in deltas.items():
            fn = self._hook(d)
            patcher.add_weight_wrapper(key, fn)
            self.functions.append(fn)

    def _hook(self, d):
        def f(w):
            self.calls += 1
            return w + d.to(w.device, w.dtype) if self.enabled else w
        return f

    @contextlib.contextmanager
    def disabled(self):
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def check(self) -> None:
        """Raise if no delta was applied since the last check although the model ran: ComfyUI
        re-loaded the model meanwhile and dropped the wrappers, so training would silently stop."""
        if self.deltas and self.calls == self._seen:
            raise RuntimeError("SafeGen: the training weight wrappers were not applied (ComfyUI re-loaded "
                               "the model meanwhile); free memory (or use --highvram) and run again")
        self._seen = self.calls


@dataclass
class Session:
    """Trainable clones of a MODEL and/or CLIP (``model`` / ``clip`` are the clones to run)."""
    model: object = None
    clip: object = None
    unet_hooks: DeltaHooks | None = None
    clip_hooks: DeltaHooks | None = None
    modes: list = field(default_factory=list)

    def unet(self) -> torch.nn.Module:
        return compat.unet(self.model)


@contextlib.contextmanager
def session(model=None, clip=None, unet_deltas: dict | None = None, clip_deltas: dict | None = None):
    """Load trainable clones of ``model`` (its UNet deltas under ``unet_deltas``, keys relative to
    the UNet) and ``clip`` (deltas keyed relative to the CLIP's model) for autograd; release them
    after. Runs under ``torch.inference_mode(False)``."""
    clones = []
    s = Session()
    with torch.inference_mode(False):
        try:
            if model is not None:
                mp, mode = compat.trainable_clone(model)
                clones.append((mp, mode, []))
                s.model = mp
                if unet_deltas:
                    s.unet_hooks = DeltaHooks(mp, {UNET_PREFIX + k: v for k, v in unet_deltas.items()})
                    clones[-1][2].extend(s.unet_hooks.functions)
            if clip is not None:
                cp, mode = compat.trainable_clone(compat.clip_patcher(clip))
                clones.append((cp, mode, []))
                s.clip = compat.clip_with_patcher(clip, cp)
                if clip_deltas:
                    s.clip_hooks = DeltaHooks(cp, clip_deltas)
                    clones[-1][2].extend(s.clip_hooks.functions)
            s.modes = [m for _, m, _ in clones]
            log.debug("SafeGen training on %s", ", ".join(s.modes))
            with compat.trainable(*[c for c, _, _ in clones]):
                yield s
        finally:
            for c, mode, fns in clones:
                compat.release(c, mode, fns)


def unet_tensors(model_or_session_model, keys) -> dict[str, torch.Tensor]:
    """The named UNet tensors as they are in the loaded model (θ0, patches applied); no copies."""
    params = dict(compat.unet(model_or_session_model).named_parameters())
    return {k: params[k].detach() for k in keys}


def run(params: dict, loss_fn, *, steps: int, lr: float, seed: int, optimizer: str, label: str = "loss",
        checkpoint_every: int = 0, keep_checkpoints: int = 2, preview_every: int = 0, on_preview=None,
        kind: str = "", name: str = "", resume: bool = False, fingerprint: dict | None = None,
        ckpt_dir: str | None = None, weight_decay: float = 0.0, grad_accum: int = 1) -> TrainResult:
    """``safegen_core.training.train`` with ComfyUI's progress bar, interrupt and checkpoint folder
    (output/safegen_checkpoints/<kind>/<name>, or ``ckpt_dir``)."""
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, optimizer=optimizer, checkpoint_every=checkpoint_every,
                      keep_checkpoints=keep_checkpoints, preview_every=preview_every, weight_decay=weight_decay,
                      grad_accum=grad_accum)
    progress = common.Progress(steps, label)
    if ckpt_dir is None and (checkpoint_every or resume):
        ckpt_dir = common.checkpoint_dir(kind, name)

    def preview(step):
        progress.preview = on_preview(step)
    return train(params, loss_fn, cfg,
                 TrainCallbacks(on_step=lambda s, n, lv: progress.step(s, lv),
                                check_interrupt=mm.throw_exception_if_processing_interrupted,
                                on_preview=preview if on_preview is not None and preview_every > 0 else None),
                 ckpt_dir=ckpt_dir, resume=resume, fingerprint=fingerprint or {})
