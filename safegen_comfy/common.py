"""Plumbing shared by the method runners: folders, progress, previews, the k-diffusion helpers.

Uses only ComfyUI's public extension points (``folder_paths``, ``comfy.sample``, ``ProgressBar``,
``model_management`` interrupt); internals go through :mod:`.compat`.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

import comfy.model_management as mm
import comfy.sample
import comfy.utils
import folder_paths

from ..safegen_core.plots import line_plot
from . import compat

log = logging.getLogger("safegen")

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- folders
def input_path(rel: str, label: str) -> str:
    """``rel`` resolved under ComfyUI's input directory; refuses paths that leave it."""
    base = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(base, rel.strip()))
    if path != base and not path.startswith(base + os.sep):
        raise ValueError(f"{label} '{rel}' must be under ComfyUI's input directory ({base})")
    return path


def checkpoint_dir(kind: str, name: str) -> str:
    """Where a trainer keeps resumable checkpoints: output/safegen_checkpoints/<kind>/<name>
    (not under models/, whose loaders would list them)."""
    return os.path.join(folder_paths.get_output_directory(), "safegen_checkpoints", kind, name)


def files_in(folder: str, extensions: tuple) -> list[str]:
    return [f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(extensions)]


def full_path(folder: str, name: str, what: str) -> str:
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"{what} '{name}' not found in models/{folder}")
    return path


def first_folder(folder: str) -> str:
    """models/<folder> (ComfyUI may list a legacy folder first for the same key, e.g. models/unet)."""
    paths = folder_paths.get_folder_paths(folder)
    named = [p for p in paths if os.path.basename(os.path.normpath(p)) == folder]
    return (named or paths)[0]


# --------------------------------------------------------------------------- model helpers
def model_sigmas(model) -> torch.Tensor:
    """k-diffusion σ of each training timestep of the model (ascending)."""
    return model.get_model_object("model_sampling").sigmas.detach().float().cpu()


def sample_preview(model, vae, positive, negative, seed: int, steps: int = 8, cfg: float = 5.0,
                   width: int = 512, height: int = 512):
    """One image with ComfyUI's sampler (euler/normal), decoded: [1,H,W,3] float in 0..1."""
    latent = torch.zeros([1, 4, height // 8, width // 8])
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                              seed=seed, disable_pbar=True)
    return vae.decode(out)


def encode_images(model, vae, images: torch.Tensor) -> torch.Tensor:
    """IMAGE batch → model-space latents as a normal (non-inference) float tensor."""
    lat = compat.process_latent_in(model, vae.encode(images[:, :, :, :3]).float())
    with torch.inference_mode(False):
        return lat.detach().float().cpu().clone()


# --------------------------------------------------------------------------- feedback
def loss_plot_image(losses, title: str) -> torch.Tensor:
    """A training-loss chart as a ComfyUI IMAGE [1,H,W,3] in 0..1."""
    return torch.from_numpy(line_plot(losses, title, smooth=10).copy()).float()[None] / 255.0


def image_to_pil(img: torch.Tensor):
    from PIL import Image
    arr = (img[0].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


class Progress:
    """ProgressBar, the step's loss as the node's progress text (at most ~4×/s), an optional preview."""

    def __init__(self, total: int, label: str = "loss"):
        self.bar = comfy.utils.ProgressBar(total)
        self.total, self.label = total, label
        self.preview = None
        self._last_text = 0.0

    def step(self, step: int, loss: float | None = None):
        mm.throw_exception_if_processing_interrupted()
        prev = ("JPEG", self.preview, 512) if self.preview is not None else None
        self.bar.update_absolute(step, self.total, prev)
        self.preview = None
        now = time.monotonic()
        if loss is not None and (now - self._last_text > 0.25 or step == self.total):
            self._last_text = now
            compat.send_progress_text(f"step {step}/{self.total}  {self.label} {loss:.5f}")
