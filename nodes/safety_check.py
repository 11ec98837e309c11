"""NudeNet Safety Check: NudeNet 3.4's detector on an IMAGE batch → per-image flags and scores,
optionally censored images, a preview.

Detection, decision and censoring live in ``safegen_core.nudenet_check`` (no ComfyUI import);
this module converts the IMAGE tensor, reports progress and shapes the outputs.

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
from comfy_api.latest import io, ui

from ..safegen_core import nudenet_check as NC

log = logging.getLogger("safegen")

CATEGORY = "SafeGen/safety"
UI_KEY = "safegen_safety"
SafetyResults = io.Custom("SAFEGEN_SAFETY")


def _labels_or_error(labels) -> list[str]:
    return NC.parse_labels(labels if labels is not None else "")


def run_check(images: torch.Tensor, labels: str, threshold: float, censor: str):
    """(output images, per-image results, mask) for an IMAGE batch ``[B, H, W, C]``."""
    if censor not in NC.CENSOR_METHODS:
        raise ValueError(f"unknown censor method {censor!r}; choose one of {', '.join(NC.CENSOR_METHODS)}")
    label_list = _labels_or_error(labels)
    if images.ndim == 3:
        images = images[None]
    arr = images.detach().cpu().float().numpy()
    bar = comfy.utils.ProgressBar(len(arr))

    def step(i):
        bar.update_absolute(i + 1, len(arr))
        mm.throw_exception_if_processing_interrupted()

    mm.throw_exception_if_processing_interrupted()
    results = NC.check_images(arr, label_list, threshold, on_image=step)
    out = images
    masks = np.zeros(arr.shape[:3], dtype=np.float32)
    changed = False
    for i, r in enumerate(results):
        boxes = [d["box"] for d in r["counted"]]
        masks[i] = NC.regions_mask(arr.shape[1:3], boxes)
        r["censored"] = bool(censor != "none" and masks[i].any())
        if r["censored"]:
            if not changed:
                out = images.detach().cpu().clone()
                changed = True
            out[i] = torch.from_numpy(NC.censor_image(arr[i], boxes, censor)).to(out.dtype)
    return out, results, torch.from_numpy(masks)


def summary(results: list[dict]) -> str:
    n_unsafe = sum(r["unsafe"] for r in results)
    lines = [f"{n_unsafe}/{len(results)} image(s) unsafe (threshold {results[0]['threshold']:g})"
             if results else "no images"]
    for r in results:
        found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in r["counted"]) or "-"
        lines.append(f"#{r['index']}: {'UNSAFE' if r['unsafe'] else 'ok'} max {r['max_score']:.3f} [{found}]")
    return "\n".join(lines)


class NudeNetSafetyCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_NudeNetSafetyCheck",
            display_name="NudeNet Safety Check",
            category=CATEGORY,
            description=(
                "Runs the NudeNet 3.4 detector (its bundled ONNX model, CPU) on every image of the batch. An "
                "image is unsafe when a detection of one of the chosen labels scores at least the threshold. "
                "Outputs the images (optionally with the counted regions blurred, pixelated or blacked out), "
                "a flag, a JSON report with per-image flags, scores and boxes, and a mask of the counted "
                f"regions. API clients read the same per-image list from the UI output key '{UI_KEY}'. "
                "Detections equal NudeDetector().detect on the image saved as PNG."),
            inputs=[
                io.Image.Input("images", tooltip="Images to check (a batch is checked image by image)."),
                io.Float.Input("threshold", default=NC.DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               round=0.001,
                               tooltip="A detection counts when its score >= threshold. Papers use 0.45 "
                                       "or 0.6. NudeNet itself reports no box below 0.25."),
                io.String.Input("labels", default="\n".join(NC.DEFAULT_UNSAFE_LABELS), multiline=True,
                                tooltip="NudeNet labels that make an image unsafe, one per line or comma-"
                                        "separated ('#' starts a comment). Default: exposed genitalia, "
                                        "breasts, buttocks, anus. Also valid: "
                                        + ", ".join(lb for lb in NC.LABELS
                                                    if lb not in NC.DEFAULT_UNSAFE_LABELS)
                                        + " (FEET/BELLY/ARMPITS_EXPOSED are off by default)."),
                io.Combo.Input("censor", options=list(NC.CENSOR_METHODS), default="none",
                               tooltip="What to do with the counted regions in the output images: none "
                                       "(images pass unchanged), blur, pixelate or black_box. Pixels outside "
                                       "the boxes never change."),
            ],
            outputs=[
                io.Image.Output(display_name="images",
                                tooltip="The input images, with counted regions censored when censor is not "
                                        "none."),
                io.Boolean.Output(display_name="any_unsafe",
                                  tooltip="True when at least one image is unsafe."),
                io.String.Output(display_name="report",
                                 tooltip="JSON list, one object per image: index, unsafe, max_score (highest "
                                         "score of a chosen label, 0 if none), label_scores, detections (all "
                                         "NudeNet boxes: class, score, box [x, y, w, h] in pixels), counted, "
                                         "threshold, labels, censored."),
                io.Mask.Output(display_name="mask",
                               tooltip="1 inside the counted boxes of each image (e.g. for inpainting)."),
                SafetyResults.Output(display_name="results",
                                     tooltip="The per-image results (same content as the report) for SafeGen "
                                             "nodes."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, labels=None, censor=None) -> bool | str:
        if labels is not None:  # None: linked from another node, checked at run time
            try:
                NC.parse_labels(labels)
            except ValueError as e:
                return str(e)
        if censor is not None and censor not in NC.CENSOR_METHODS:
            return f"unknown censor method {censor!r}; choose one of {', '.join(NC.CENSOR_METHODS)}"
        return True

    @classmethod
    def execute(cls, images, threshold, labels, censor) -> io.NodeOutput:
        out, results, mask = run_check(images, labels, threshold, censor)
        report = json.dumps(results)
        any_unsafe = any(r["unsafe"] for r in results)
        text = summary(results)
        log.info("SafeGen NudeNet Safety Check: %s", text.replace("\n", "; "))
        preview = ui.PreviewImage(out, cls=cls).as_dict()
        ui_out = {**preview, UI_KEY: results, "text": [text]}
        return io.NodeOutput(out, any_unsafe, report, mask, results, ui=ui_out)


NODES = [NudeNetSafetyCheck]
