"""Unlearned UNet Loader: concept-erased UNet weights applied to a MODEL as patches (schema only;
the runtime is ``safegen_comfy.unlearned``)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..safegen_comfy import unlearned


class UnlearnedUNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_UnlearnedUNetLoader",
            display_name="Unlearned UNet Loader",
            category="SafeGen/unlearning",
            description=(
                "Applies a concept-erased (unlearned) UNet — ESD, UCE, RECE full or partial weights, or a "
                "DUO/MACE/SPM LoRA-style adapter — to a base MODEL as patches. The cached base is not "
                "modified. Strength 1 reproduces the unlearned model, 0 the base; values between blend "
                "the weight difference. A full UNet file also loads without a base MODEL."),
            inputs=[
                io.Combo.Input("unet_name", options=unlearned.diffusion_model_files(),
                               tooltip="Unlearned weights in models/diffusion_models: full UNet (LDM or "
                                       "diffusers layout), partial file (ESD-x/-u, UCE) or LoRA adapter."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.05,
                               tooltip="1 = the unlearned model, 0 = the base; between blends the weight "
                                       "difference (beyond 1 extrapolates)."),
                io.Model.Input("model", optional=True,
                               tooltip="Base MODEL the unlearned weights were made from (from any loader). "
                                       "Optional for a full UNet file."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The unlearned model (base + patches)."),
                io.String.Output(display_name="info",
                                 tooltip="Detected format, tensors replaced and blocks touched."),
            ],
        )

    @classmethod
    def execute(cls, unet_name, strength, model=None) -> io.NodeOutput:
        m, text = unlearned.load(unet_name, strength, model)
        return io.NodeOutput(m, text, ui=ui.PreviewText(text))


NODES = [UnlearnedUNetLoader]
