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
                "SD1.x (CLIP-L): the self-validating filter keeps the projected conditioning for SAFREE's "
                "share of the run (its first k+1 of 50 steps → the same share of your sampler's steps, "
                "resolved on the sampler's sigmas, any scheduler), the original after. SDXL: as the "
                "reference, only the CLIP-G columns are projected (subspaces from CLIP-G's projected pooled "
                "outputs), every step. Use the concept list (or an implicit negative embedding) as the "
                "sampler's negative, as the reference does."),
            inputs=[
                io.Clip.Input("clip", tooltip="CLIP of the model (SD1.x or SDXL)."),
                io.String.Input("text", default="", multiline=True, tooltip="The prompt."),
                io.String.Input("toxic_concepts", default="\n".join(safree.NUDITY_CONCEPTS), multiline=True,
                                tooltip="One concept phrase per line (each encoded separately; its pooled "
                                        "output spans the toxic subspace). Default: SAFREE's nudity list."),
                io.Float.Input("alpha", default=safree.DEFAULT_ALPHA, min=0.0, max=10.0, step=0.001, round=0.0001,
                               tooltip="sf_alpha (reference 0.01): a token is flagged when masking it moves the "
                                       "prompt (1 + alpha)× farther from the subspace than the others do on "
                                       "average."),
                io.Boolean.Input("self_validating_filter", default=True,
                                 tooltip="SD1.x — on (reference -svf): the projected conditioning for the first "
                                         "f_beta(beta, up_t)+1 of SAFREE's 50 steps, as that share of your "
                                         "sampler's steps; off: every step. SDXL: SAFREE's SDXL pipeline has "
                                         "no such filter, so it projects every step either way (said in the "
                                         "report)."),
                io.Int.Input("up_t", default=safree.DEFAULT_UP_T, min=0, max=50,
                             tooltip="Upper bound of the self-validating filter, in SAFREE's 50 steps "
                                     "(reference: 10, i.e. at most 22% of the run)."),
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
                io.Conditioning.Output(display_name="original",
                                       tooltip="The prompt encoded without filtering (for SAFREE Latent "
                                               "Re-Attention)."),
            ],
        )

    @classmethod
    def execute(cls, clip, text, toxic_concepts, alpha, self_validating_filter, up_t, embedding=None,
                embedding_2=None) -> io.NodeOutput:
        cond, original, report = safree.prompt_filter(clip, text, toxic_concepts, alpha, self_validating_filter,
                                                      up_t, [e for e in (embedding, embedding_2) if e is not None])
        return io.NodeOutput(cond, report, original, ui=ui.PreviewText(report))


class SAFREEReattention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        b1, b2, s1, s2 = safree.DEFAULT_FREEU_HYP
        return io.Schema(
            node_id="SafeGen_SAFREEReattention",
            display_name="SAFREE Latent Re-Attention",
            category=CATEGORY,
            description=(
                "SAFREE's latent re-attention (its SafeGuard_Low_Fourier_filter): the original prompt is "
                "predicted in the same batch as the filtered one, and at the decoder stages with 4× and 2× "
                "the base channels the lowest spatial frequencies of the filtered prompt's skip features are "
                "replaced by s1/s2 wherever the original prompt's are not larger; b1/b2 scale the first half "
                "of the backbone channels. Off by default: SAFREE's released script installs this patch "
                "without selecting the filter, so its published numbers were made without it."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (SD1.x or SDXL)."),
                io.Float.Input("b1", default=b1, min=0.0, max=10.0, step=0.01,
                               tooltip="Backbone factor at the 4×-channel stage (reference 1.0)."),
                io.Float.Input("b2", default=b2, min=0.0, max=10.0, step=0.01,
                               tooltip="Backbone factor at the 2×-channel stage (reference 1.0)."),
                io.Float.Input("s1", default=s1, min=0.0, max=10.0, step=0.01,
                               tooltip="Replacement value of the low-frequency coefficients at the 4×-channel "
                                       "stage (reference 0.9)."),
                io.Float.Input("s2", default=s2, min=0.0, max=10.0, step=0.01,
                               tooltip="The same at the 2×-channel stage (reference 0.2)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Apply from this fraction of the denoising on (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Apply until this fraction of the denoising (1 = last step)."),
                io.Combo.Input("mode", options=list(safree.REATTENTION_MODES), default="off", optional=True,
                               tooltip="off: the model passes through unchanged (as SAFREE's published runs). "
                                       "safeguard-low: SAFREE's SafeGuard low-frequency filter (needs "
                                       "'original')."),
                io.Conditioning.Input("original", optional=True,
                                      tooltip="The unfiltered prompt (the SAFREE Prompt Filter's 'original' "
                                              "output); predicted in the same batch, its result discarded."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with latent re-attention.")],
        )

    @classmethod
    def execute(cls, model, b1, b2, s1, s2, start_percent, end_percent, mode="off", original=None) -> io.NodeOutput:
        return io.NodeOutput(safree.patch_model_reattention(model, mode, original, b1, b2, s1, s2, start_percent,
                                                            end_percent))


NODES = [SAFREEPromptFilter, SAFREEReattention]
