"""ESD Concept Eraser — schema only; the runtime is ``safegen_comfy.esd`` (design: docs/erasers.md)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..safegen_comfy import esd

CATEGORY = "SafeGen/unlearning"


class ESDConceptEraser(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_ESDConceptEraser",
            display_name="ESD Concept Eraser",
            category=CATEGORY,
            description=(
                "ESD (Erasing Concepts from Diffusion Models): fine-tunes the chosen UNet weights so the "
                "model's prediction for the concept becomes the original model's prediction negatively "
                "guided away from it: ε* = ε0(∅) − η(ε0(c) − ε0(∅)), on latents partially sampled with the "
                "concept. Only the selected tensors train (as differences); the input MODEL is not modified. "
                "Saves a partial file in models/diffusion_models that the Unlearned UNet Loader reads, and "
                "returns the erased MODEL. Refuses a concept the model does not distinguish from the empty "
                "prompt (nothing to erase) and warns when the loss rose over the run."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to erase the concept from (SD1.x or SDXL)."),
                io.Clip.Input("clip",
                              tooltip="The CLIP of that model (encodes the concept and the empty prompt)."),
                io.String.Input("concept", default="nudity", tooltip="The concept to erase, as a prompt."),
                io.Combo.Input("variant", options=list(esd.VARIANTS), default="x",
                               tooltip="Which weights train. x: cross-attention (attn2; for named objects, "
                                       "styles); u: everything but cross-attention (for global concepts like "
                                       "nudity) — with xt_sampler erased as CompVis 'noxattn' (all parameters "
                                       "incl. norms, not out.*/time_embed*), with original as esd_sd.py "
                                       "'esd-u' (Linear/Conv2d only); x-strict: attn2.to_k/to_v only."),
                io.Float.Input("eta", default=1.0, min=0.0, max=20.0, step=0.1,
                               tooltip="η, the negative guidance of the target (paper: 1; the newer "
                                       "esd_sd.py's negative_guidance 2 equals η 1 here)."),
                io.Int.Input("steps", default=0, min=0, max=100000,
                             tooltip="Training iterations; 0 = the default of the reference the x_t sampler "
                                     "follows: erased → CompVis train-esd.py 1000, original → esd_sd.py 200."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-6,
                               tooltip="Adam learning rate; 0 = the reference's: erased → CompVis 1e-5, "
                                       "original → esd_sd.py 5e-5."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the per-step draws (timestep, start noise); a resumed run "
                                     "follows the same path."),
                io.Int.Input("sampling_steps", default=50, min=2, max=1000,
                             tooltip="N of the DDIM schedule used to make x_t (reference 50); each step "
                                     "samples k < N of them, so cost grows with N."),
                io.Float.Input("start_guidance", default=3.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale of the partial sampling that makes x_t (reference 3)."),
                io.Int.Input("resolution", default=512, min=16, max=4096, step=8,
                             tooltip="Image size of the training latents (pixels; latent = /8). Smaller is "
                                     "much faster on CPU."),
                io.Combo.Input("xt_sampler", options=list(esd.XT_SAMPLERS), default="erased",
                               tooltip="Which reference ESD follows. erased: CompVis train-esd.py — the model "
                                       "being trained samples x_t with DDIM, the loss timestep is jittered "
                                       "within the DDIM bin. original: esd_sd.py — the frozen model samples "
                                       "x_t with PLMS, loss at that step. Sets the defaults of steps and "
                                       "learning_rate and ESD-u's trained tensors."),
                io.String.Input("name", default="esd_concept",
                                tooltip="File name in models/diffusion_models (sanitised); also the "
                                        "checkpoint folder."),
                io.Int.Input("checkpoint_every", default=50, min=0, max=100000,
                             tooltip="Save a resumable checkpoint every N steps (0 = never)."),
                io.Int.Input("keep_checkpoints", default=2, min=1, max=100,
                             tooltip="Checkpoints kept (newest)."),
                io.Int.Input("preview_every", default=0, min=0, max=100000,
                             tooltip="Sample a preview of the concept prompt with the current weights every "
                                     "N steps (needs the VAE; 0 = off)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the newest compatible checkpoint of this name."),
                io.Vae.Input("vae", optional=True, tooltip="Only for preview images."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL",
                                tooltip="The erased model: input MODEL + learned differences as patches (the "
                                        "input stays unchanged)."),
                io.Image.Output(display_name="loss_plot", tooltip="ESD loss per step."),
                io.String.Output(display_name="info", tooltip="Saved file, tensors trained, losses."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, concept, variant, eta, steps, learning_rate, seed, sampling_steps,
                start_guidance, resolution, xt_sampler, name, checkpoint_every, keep_checkpoints,
                preview_every, resume, vae=None):
        m, plot, info = esd.run_esd(
            model, clip, concept, name=name, variant=variant, eta=eta, steps=steps, learning_rate=learning_rate,
            seed=seed, sampling_steps=sampling_steps, start_guidance=start_guidance, resolution=resolution,
            xt_sampler=xt_sampler, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
            preview_every=preview_every, resume=resume, vae=vae)
        return io.NodeOutput(m, plot, info, ui=ui.PreviewText(info))


NODES = [ESDConceptEraser]
