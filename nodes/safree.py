"""SAFREE Prompt Filter and SAFREE Latent Re-Attention — schemas only; the runtime is
``safegen_comfy.safree``."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..safegen_comfy import safree, sockets

CATEGORY = "SafeGen/guidance"


class SAFREEPromptFilter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_SAFREEPromptFilter",
            display_name="SAFREE Prompt Filter",
            category=CATEGORY,
            description=(
                "SAFREE (training-free): encodes the prompt like CLIPTextEncode, then projects the prompt "
                "tokens that point towards the toxic-concept subspace onto its orthogonal complement. "
                "The self-validating filter keeps the projected conditioning only for the first steps "
                "(start/end percent), the original after. SD1.x (CLIP-L) and SDXL (CLIP-L and CLIP-G, "
                "each with its own subspace). Use the concept list as the negative prompt as the reference "
                "does."),
            inputs=[
                io.Clip.Input("clip", tooltip="CLIP of the model (SD1.x or SDXL)."),
                io.String.Input("text", default="", multiline=True, tooltip="The prompt."),
                io.String.Input("toxic_concepts", default="\n".join(safree.NUDITY_CONCEPTS), multiline=True,
                                tooltip="One concept phrase per line (each encoded separately; its pooled "
                                        "output spans the toxic subspace). Default: SAFREE's nudity list."),
                io.Float.Input("alpha", default=safree.DEFAULT_ALPHA, min=0.0, max=10.0, step=0.001, round=0.0001,
                               tooltip="sf_alpha: a token is flagged when masking it moves the prompt "
                                       "(1 + alpha)× farther from the subspace than the others do on "
                                       "average."),
                io.Boolean.Input("self_validating_filter", default=True,
                                 tooltip="On: projected conditioning for the first f_beta(beta, up_t)+1 "
                                         "steps "
                                         "only. Off: projected conditioning for every step."),
                io.Int.Input("up_t", default=safree.DEFAULT_UP_T, min=0, max=1000,
                             tooltip="Upper bound of the self-validating filter's step count "
                                     "(reference: 10)."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="The sampler's step count, to turn the filter's step count into "
                                     "start/end percent (exact for normal/simple/sgm_uniform/ddim_uniform "
                                     "schedulers)."),
                sockets.Embedding.Input("embedding", optional=True,
                                tooltip="Implicit negative EMBEDDING; its encoded pooled output joins the "
                                        "toxic subspace."),
                sockets.Embedding.Input("embedding_2", optional=True,
                                tooltip="A second implicit negative EMBEDDING."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING", tooltip="Filtered prompt conditioning."),
                io.String.Output(display_name="report",
                                 tooltip="Flagged tokens per encoder and the step window."),
            ],
        )

    @classmethod
    def execute(cls, clip, text, toxic_concepts, alpha, self_validating_filter, up_t, steps, embedding=None,
                embedding_2=None) -> io.NodeOutput:
        cond, report = safree.prompt_filter(clip, text, toxic_concepts, alpha, self_validating_filter, up_t, steps,
                                            [e for e in (embedding, embedding_2) if e is not None])
        return io.NodeOutput(cond, report, ui=ui.PreviewText(report))


class SAFREEReattention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        b1, b2, s1, s2 = safree.DEFAULT_FREEU_HYP
        return io.Schema(
            node_id="SafeGen_SAFREEReattention",
            display_name="SAFREE Latent Re-Attention",
            category=CATEGORY,
            description=(
                "SAFREE's latent re-attention: a FreeU-style decoder patch that scales the backbone features "
                "(b) and attenuates the low frequencies of the skip features (s) at the decoder stages with "
                "4× and 2× the model's base channels (SD1.x/SDXL: 1280 and 640). Reference defaults "
                "freeu_hyp 1.0-1.0-0.9-0.2, applied for the whole run."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (SD1.x or SDXL)."),
                io.Float.Input("b1", default=b1, min=0.0, max=10.0, step=0.01,
                               tooltip="Backbone factor at the 4×-channel stage (first half of channels)."),
                io.Float.Input("b2", default=b2, min=0.0, max=10.0, step=0.01,
                               tooltip="Backbone factor at the 2×-channel stage."),
                io.Float.Input("s1", default=s1, min=0.0, max=10.0, step=0.01,
                               tooltip="Low-frequency scale of the skip features at the 4×-channel stage."),
                io.Float.Input("s2", default=s2, min=0.0, max=10.0, step=0.01,
                               tooltip="Low-frequency scale of the skip features at the 2×-channel stage."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Apply from this fraction of the denoising on (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Apply until this fraction of the denoising (1 = last step)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with latent re-attention.")],
        )

    @classmethod
    def execute(cls, model, b1, b2, s1, s2, start_percent, end_percent) -> io.NodeOutput:
        return io.NodeOutput(safree.patch_model_reattention(model, b1, b2, s1, s2, start_percent, end_percent))


NODES = [SAFREEPromptFilter, SAFREEReattention]
