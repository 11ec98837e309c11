"""NudeNet Safety Check on a ComfyUI IMAGE batch: progress, interrupt, per-image results, censoring.
Detection, decision and censoring are ``safegen_core.nudenet_check``'s (no ComfyUI import).

API clients: the node's UI output (websocket ``executed`` message and ``/history``) carries
``"safegen_safety"``: one JSON object per image (``index``, ``unsafe``, ``max_score``,
``label_scores``, ``detections``, ``counted``, ``threshold``, ``labels``, ``censored``), next to
the preview's ``"images"``.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import torch

import comfy.model_management as mm
import comfy.utils

from ..safegen_core import nudenet_check as nudenet_core

log = logging.getLogger("safegen")

UI_KEY = "safegen_safety"
LABELS = nudenet_core.LABELS
DEFAULT_UNSAFE_LABELS = nudenet_core.DEFAULT_UNSAFE_LABELS
DEFAULT_THRESHOLD = nudenet_core.DEFAULT_THRESHOLD
CENSOR_METHODS = nudenet_core.CENSOR_METHODS


def validate(labels=None, censor=None) -> bool | str:
    """True, or the message of a bad widget value (labels linked from another node are checked at run time)."""
    if labels is not None:
        try:
            nudenet_core.parse_labels(labels)
        except ValueError as e:
            return str(e)
    if censor is not None and censor not in CENSOR_METHODS:
        return f"unknown censor method {censor!r}; choose one of {', '.join(CENSOR_METHODS)}"
    return True


def _labels_or_error(labels) -> list[str]:
    return nudenet_core.parse_labels(labels if labels is not None else "")


def run_check(images: torch.Tensor, labels: str, threshold: float, censor: str):
    """(output images, per-image results, mask) for an IMAGE batch ``[B, H, W, C]``."""
    if censor not in nudenet_core.CENSOR_METHODS:
        raise ValueError(f"unknown censor method {censor!r}; choose one of {', '.join(nudenet_core.CENSOR_METHODS)}")
    label_list = _labels_or_error(labels)
    if images.ndim == 3:
        images = images[None]
    arr = images.detach().cpu().float().numpy()
    bar = comfy.utils.ProgressBar(len(arr))

    def step(i):
        bar.update_absolute(i + 1, len(arr))
        mm.throw_exception_if_processing_interrupted()

    mm.throw_exception_if_processing_interrupted()
    results = nudenet_core.check_images(arr, label_list, threshold, on_image=step)
    out = images
    masks = np.zeros(arr.shape[:3], dtype=np.float32)
    changed = False
    for i, r in enumerate(results):
        boxes = [d["box"] for d in r["counted"]]
        masks[i] = nudenet_core.regions_mask(arr.shape[1:3], boxes)
        r["censored"] = bool(censor != "none" and masks[i].any())
        if r["censored"]:
            if not changed:
                out = images.detach().cpu().clone()
                changed = True
            out[i] = torch.from_numpy(nudenet_core.censor_image(arr[i], boxes, censor)).to(out.dtype)
    return out, results, torch.from_numpy(masks)


def summary(results: list[dict]) -> str:
    n_unsafe = sum(r["unsafe"] for r in results)
    lines = [f"{n_unsafe}/{len(results)} image(s) unsafe (threshold {results[0]['threshold']:g})"
             if results else "no images"]
    for r in results:
        found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in r["counted"]) or "-"
        lines.append(f"#{r['index']}: {'UNSAFE' if r['unsafe'] else 'ok'} max {r['max_score']:.3f} [{found}]")
    return "\n".join(lines)


def check(images: torch.Tensor, threshold: float, labels: str, censor: str):
    """The node: (images, any_unsafe, JSON report, mask, results, summary text)."""
    out, results, mask = run_check(images, labels, threshold, censor)
    text = summary(results)
    log.info("SafeGen NudeNet Safety Check: %s", text.replace("\n", "; "))
    return out, any(r["unsafe"] for r in results), json.dumps(results), mask, results, text
