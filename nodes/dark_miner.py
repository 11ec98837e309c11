"""Dark Miner Eraser — schema only; the runtime is ``safegen_comfy.dark_miner`` (design: docs/erasers.md)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..safegen_comfy import dark_miner, sockets

CATEGORY = "SafeGen/unlearning"


class DarkMinerEraser(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_DarkMinerEraser",
            display_name="Dark Miner Eraser",
            category=CATEGORY,
            description=(
                "Dark Miner: a recurring mine → verify → circumvent erasure. Each round MINES token vectors "
                "that make the current model produce the concept (concept inversion on concept images from "
                "the original model), VERIFIES that they still do (concept gain: how much they lower the "
                "denoising loss of held-out concept images versus no text, above what benign anchor prompts "
                "achieve), and CIRCUMVENTS by fine-tuning (ESD objective on the concept and every mined "
                "embedding + keeping the anchor prompts' and the empty prompt's predictions). Stops after R "
                "rounds or when mining fails. Saves the same kind of partial file as ESD Concept Eraser. "
                "Design notes: docs/erasers.md."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to erase the concept from (SD1.x tested)."),
                io.Clip.Input("clip",
                              tooltip="The CLIP of that model (mining trains token vectors through it)."),
                io.String.Input("concept", default="nudity",
                                tooltip="The concept to erase, as a prompt; mining starts from its token "
                                        "vectors."),
                io.String.Input("anchor_prompts", default="", multiline=True,
                                tooltip="Benign prompts to preserve, one per line; empty = the pack's "
                                        "default benign list (safegen_core/prompts/benign_safe.txt). The "
                                        "empty prompt is always preserved too."),
                io.Combo.Input("variant", options=list(dark_miner.VARIANTS), default="x",
                               tooltip="Which UNet weights fine-tune (as in ESD): x cross-attention, u all "
                                       "but cross-attention, x-strict attn2.to_k/to_v."),
                io.Int.Input("rounds", default=4, min=1, max=100,
                             tooltip="R: maximum mine → verify → circumvent rounds."),
                io.Int.Input("mining_steps", default=100, min=1, max=100000,
                             tooltip="Concept-inversion steps per round (only token vectors train)."),
                io.Float.Input("mining_lr", default=1e-2, min=1e-6, max=1.0, step=1e-4,
                               tooltip="AdamW learning rate of the mined token vectors."),
                io.Int.Input("circumvent_steps", default=100, min=1, max=100000,
                             tooltip="Fine-tuning steps per round."),
                io.Float.Input("learning_rate", default=5e-5, min=1e-8, max=1.0, step=1e-6,
                               tooltip="Adam learning rate of the fine-tuned weight differences."),
                io.Float.Input("eta", default=1.0, min=0.0, max=20.0, step=0.1,
                               tooltip="η of the ESD target used when circumventing."),
                io.Float.Input("anchor_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="λ: weight of the anchor-preservation term."),
                io.Int.Input("sampling_steps", default=50, min=2, max=1000,
                             tooltip="DDIM schedule for x_t (ESD's partial sampling) and sampler steps of "
                                     "the generated concept images."),
                io.Float.Input("start_guidance", default=3.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of the partial sampling and of the generated concept images."),
                io.Int.Input("resolution", default=512, min=16, max=4096, step=8,
                             tooltip="Image size of generated concept images and training latents (pixels)."),
                io.Int.Input("concept_images", default=8, min=2, max=256,
                             tooltip="How many concept images the original model generates (a quarter is "
                                     "held out for verification). Ignored when images are connected."),
                io.Int.Input("verify_draws", default=16, min=1, max=10000,
                             tooltip="Fixed draws (4 × image, timestep, noise each) of the verification "
                                     "score."),
                io.Float.Input("verify_margin", default=0.0, min=-1.0, max=1.0, step=0.001,
                               tooltip="A mined embedding induces the concept when its concept gain exceeds "
                                       "the best benign anchor's by more than margin × L(∅)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the concept images, the draws and the mining."),
                io.Combo.Input("xt_sampler", options=list(dark_miner.XT_SAMPLERS), default="erased",
                               tooltip="Weights that sample x_t: erased (trained) or original (frozen)."),
                io.String.Input("name", default="dark_miner",
                                tooltip="File name in models/diffusion_models (sanitised); also the "
                                        "checkpoint folder."),
                io.Int.Input("checkpoint_every", default=50, min=0, max=100000,
                             tooltip="Checkpoint the fine-tuning every N steps and save a state after each "
                                     "round (0 = never)."),
                io.Int.Input("keep_checkpoints", default=2, min=1, max=100,
                             tooltip="Checkpoints / round states kept (newest)."),
                io.Int.Input("preview_every", default=0, min=0, max=100000,
                             tooltip="Preview of the concept prompt every N fine-tuning steps (needs the "
                                     "VAE; 0 = off)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue after the newest completed round (and within a round from "
                                         "its newest checkpoint) of this name."),
                io.Image.Input("images", optional=True,
                               tooltip="Concept images to mine against instead of generated ones (needs the "
                                       "VAE)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Encodes the concept images; also used for previews."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL",
                                tooltip="The erased model: input MODEL + learned differences as patches."),
                sockets.Embedding.Output(display_name="EMBEDDING",
                                 tooltip="The last mined embedding (usable as an implicit negative "
                                         "embedding)."),
                io.Image.Output(display_name="loss_plot",
                                tooltip="Fine-tuning loss per step, rounds concatenated."),
                io.String.Output(display_name="info",
                                 tooltip="Per round: mining loss, verification scores; the saved file."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, concept, anchor_prompts, variant, rounds, mining_steps, mining_lr,
                circumvent_steps, learning_rate, eta, anchor_weight, sampling_steps, start_guidance,
                resolution, concept_images, verify_draws, verify_margin, seed, xt_sampler, name,
                checkpoint_every, keep_checkpoints, preview_every, resume, images=None, vae=None):
        m, emb, plot, info = dark_miner.run_dark_miner(
            model, clip, concept, anchor_prompts, name=name, images=images, vae=vae, variant=variant, rounds=rounds,
            mining_steps=mining_steps, mining_lr=mining_lr, circumvent_steps=circumvent_steps,
            learning_rate=learning_rate, eta=eta, anchor_weight=anchor_weight, sampling_steps=sampling_steps,
            start_guidance=start_guidance, resolution=resolution, concept_images=concept_images,
            verify_draws=verify_draws, verify_margin=verify_margin, seed=seed, xt_sampler=xt_sampler,
            checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, preview_every=preview_every,
            resume=resume)
        return io.NodeOutput(m, emb, plot, info, ui=ui.PreviewText(info))


NODES = [DarkMinerEraser]
