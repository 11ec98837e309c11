"""SLD Safety Guidance (MODEL patch for the stock KSampler) and SLD Guider (GUIDER for
SamplerCustomAdvanced) — schemas only; the runtime is ``safegen_comfy.sld``."""
from __future__ import annotations

from comfy_api.latest import io

from ..safegen_comfy import sld

CATEGORY = "SafeGen/guidance"


def _sld_inputs():
    d = sld.DEFAULTS
    return [
        io.Combo.Input("preset", options=sld.PRESETS, default="medium",
                       tooltip="SLD hyper-parameter set of the paper / diffusers SafetyConfig "
                               "(warmup/scale/threshold/momentum/beta): weak 15/20/0.0/0.0/0.0, "
                               "medium 10/1000/0.01/0.3/0.4, strong 7/2000/0.025/0.5/0.7, "
                               "max 0/5000/1.0/0.5/0.7. The warm-up counts steps of diffusers' 50-step "
                               "default, so presets keep it as that share of your run: weak 30%, medium "
                               "20%, strong 14%, max 0% of the sampler's steps (medium: 4 of 20 steps). "
                               "'custom' uses the values below."),
        io.Int.Input("warmup_steps", default=d.warmup_steps, min=0, max=10000,
                     tooltip="custom only: warm-up as an ABSOLUTE step count — the safety term applies "
                             "from this step index on (momentum is accumulated during warm-up). Presets "
                             "ignore it and use their share of the run."),
        io.Float.Input("guidance_scale", default=d.guidance_scale, min=0.0, max=100000.0, step=1.0,
                       tooltip="custom: SLD scale sS (per-element scale min(|eps_c - eps_s|·sS, 1)); "
                               "<= 1 disables SLD."),
        io.Float.Input("threshold", default=d.threshold, min=-10.0, max=10.0, step=0.001, round=0.0001,
                       tooltip="custom: lambda; elements where eps_c - eps_s >= lambda get no safety term."),
        io.Float.Input("momentum_scale", default=d.momentum_scale, min=0.0, max=10.0, step=0.01,
                       tooltip="custom: sm, weight of the safety momentum."),
        io.Float.Input("momentum_beta", default=d.momentum_beta, min=0.0, max=1.0, step=0.01,
                       tooltip="custom: beta_m, momentum decay."),
    ]


class SLDGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_SLDGuidance",
            display_name="SLD Safety Guidance",
            category=CATEGORY,
            description=(
                "Safe Latent Diffusion: patches the MODEL so the stock KSampler steers away from a safety "
                "concept. The safety conditioning (a CLIPTextEncode of the concept text, or an implicit "
                "negative embedding from 'Load Implicit Negative Embedding') is predicted in the same batch "
                "as positive and negative; the guidance follows diffusers' StableDiffusionPipelineSafe. "
                "Active only when the sampler's cfg > 1. Steps are the sampler's own steps (a two-evaluation "
                "sampler such as Heun or DPM2 advances the momentum once per step, not per evaluation)."),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (SD1.x or SDXL)."),
                io.Conditioning.Input("safety", tooltip="Safety concept C_S: e.g. CLIPTextEncode of "
                                                        "the SLD default concept text, or an INE."),
                *_sld_inputs(),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with SLD; use with KSampler.")],
        )

    @classmethod
    def execute(cls, model, safety, preset, warmup_steps, guidance_scale, threshold, momentum_scale,
                momentum_beta) -> io.NodeOutput:
        params = sld.sld_params(preset, warmup_steps, guidance_scale, threshold, momentum_scale, momentum_beta)
        return io.NodeOutput(sld.patch_model_sld(model, safety, params))


class SLDGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_SLDGuider",
            display_name="SLD Guider",
            category=CATEGORY,
            description=(
                "GUIDER for SamplerCustomAdvanced: classifier-free guidance plus Safe Latent Diffusion, "
                "with positive, negative and safety predicted in one batch."),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (SD1.x or SDXL)."),
                io.Conditioning.Input("positive", tooltip="The prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (CFG's unconditional)."),
                io.Conditioning.Input("safety",
                                      tooltip="Safety concept C_S (text or implicit negative embedding)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale; SLD is active only when cfg > 1."),
                *_sld_inputs(),
            ],
            outputs=[io.Guider.Output(display_name="GUIDER", tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, safety, cfg, preset, warmup_steps, guidance_scale, threshold,
                momentum_scale, momentum_beta) -> io.NodeOutput:
        params = sld.sld_params(preset, warmup_steps, guidance_scale, threshold, momentum_scale, momentum_beta)
        return io.NodeOutput(sld.sld_guider(model, positive, negative, safety, cfg, params))


NODES = [SLDGuidance, SLDGuider]
