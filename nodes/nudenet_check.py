"""NudeNet Safety Check (schema only; the runtime is ``safegen_comfy.nudenet``)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..safegen_comfy import nudenet, sockets

CATEGORY = "SafeGen/safety"


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
                f"regions. API clients read the same per-image list from the UI output key '{nudenet.UI_KEY}'. "
                "Detections equal NudeDetector().detect on the image saved as PNG."),
            inputs=[
                io.Image.Input("images", tooltip="Images to check (a batch is checked image by image)."),
                io.Float.Input("threshold", default=nudenet.DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               round=0.001,
                               tooltip="A detection counts when its score >= threshold. Papers use 0.45 "
                                       "or 0.6. NudeNet itself reports no box below 0.25."),
                io.String.Input("labels", default="\n".join(nudenet.DEFAULT_UNSAFE_LABELS), multiline=True,
                                tooltip="NudeNet labels that make an image unsafe, one per line or comma-"
                                        "separated ('#' starts a comment). Default: exposed genitalia, "
                                        "breasts, buttocks, anus. Also valid: "
                                        + ", ".join(lb for lb in nudenet.LABELS
                                                    if lb not in nudenet.DEFAULT_UNSAFE_LABELS)
                                        + " (FEET/BELLY/ARMPITS_EXPOSED are off by default)."),
                io.Combo.Input("censor", options=list(nudenet.CENSOR_METHODS), default="none",
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
                sockets.SafetyResults.Output(display_name="results",
                                     tooltip="The per-image results (same content as the report) for SafeGen "
                                             "nodes."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, labels=None, censor=None) -> bool | str:
        return nudenet.validate(labels, censor)

    @classmethod
    def execute(cls, images, threshold, labels, censor) -> io.NodeOutput:
        out, any_unsafe, report, mask, results, text = nudenet.check(images, threshold, labels, censor)
        ui_out = {**ui.PreviewImage(out, cls=cls).as_dict(), nudenet.UI_KEY: results, "text": [text]}
        return io.NodeOutput(out, any_unsafe, report, mask, results, ui=ui_out)


NODES = [NudeNetSafetyCheck]
