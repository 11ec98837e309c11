"""Concept Inversion Trainer and Load Implicit Negative Embedding (INE) — schemas only; the runtime
is ``safegen_comfy.inversion``.

The trainer learns, on the MODEL/CLIP/VAE it is given (the loaded unlearned model, through
ComfyUI's model management), token vectors that still make that model produce the concept.
The loader turns such vectors into CONDITIONING for a sampler's negative or a guidance node.
"""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..safegen_comfy import inversion, sockets


class ConceptInversionTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_ConceptInversionTrainer",
            display_name="Concept Inversion Trainer",
            category="SafeGen/inversion",
            description=(
                "Learns an implicit negative embedding (INE): token vectors that still make THIS model — "
                "typically an unlearned one — produce the concept shown in the images. Only the new vectors "
                "train; images are VAE-encoded once. Saves models/embeddings/<name>.safetensors "
                "(usable as embedding:<name>) and returns the EMBEDDING."),
            inputs=[
                io.Model.Input("model", tooltip="The model to invert against (e.g. from Unlearned UNet Loader)."),
                io.Clip.Input("clip", tooltip="The CLIP of that model (SD1.x or SDXL)."),
                io.Vae.Input("vae", tooltip="VAE used once to encode the training images."),
                io.String.Input("name", default="ine_concept",
                                tooltip="File name in models/embeddings (sanitised); also the checkpoint folder."),
                io.Int.Input("num_vectors", default=1, min=1, max=16,
                             tooltip="Token vectors to learn (INE paper: 1)."),
                io.String.Input("init_text", default="person",
                                tooltip="Initial vectors come from these words' token embeddings."),
                io.String.Input("template", default=inversion.DEFAULT_TEMPLATE, multiline=True,
                                tooltip="Training prompts, one drawn per sample: cce:object (default), "
                                        "cce:style or cce:person are CCE's template lists ('a photo of a {}', "
                                        "…; np/concept_inversion.py:422-477), or your own prompts, one per "
                                        "line, {} where the embedding goes."),
                io.Int.Input("steps", default=3000, min=1, max=100000,
                             tooltip="Optimisation steps. Default 3000: the INE paper's, for ldm. CCE's "
                                     "train.sh: 5000 (np), 1000 (sld)."),
                io.Float.Input("learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4,
                               tooltip="AdamW learning rate. Default 5e-3: INE paper and CCE train.sh (CCE then "
                                       "multiplies it by batch × accumulation: 0.08 np, 0.02 sld; not done "
                                       "here)."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Images per micro-batch (INE: 1; CCE np: 4; sld must be 1)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the timestep/noise/template draws (a resumed run follows the "
                                     "same path)."),
                io.Combo.Input("objective", options=list(inversion.OBJECTIVES), default="ldm",
                               tooltip="ldm: plain denoising loss on this model (INE, for unlearned models). "
                                       "np: CCE's for a negative-prompt defence — the prediction with "
                                       "negative_text as negative must equal the undefended CFG prediction of "
                                       "negative_text (np/concept_inversion.py:1004-1008). sld: CCE's for SLD "
                                       "— the same target under SLD with momentum over sorted timesteps "
                                       "(sld/concept_inversion.py:1032-1098)."),
                io.Float.Input("guidance_scale", default=7.5, min=0.0, max=30.0, step=0.1,
                               tooltip="np/sld: CFG scale g (CCE: 7.5)."),
                io.String.Input("negative_text", default="", multiline=True,
                                tooltip="np/sld: the safety concept the defence uses — the negative prompt "
                                        "(np) or SLD's safety concept (sld). Required for np/sld."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=100000,
                             tooltip="Save a resumable checkpoint every N steps (0 = never)."),
                io.Int.Input("keep_checkpoints", default=2, min=1, max=100, tooltip="Checkpoints kept (newest)."),
                io.Int.Input("preview_every", default=0, min=0, max=100000,
                             tooltip="Generate a preview image with the current embedding every N steps "
                                     "(0 = off; costs a short sampling run each time)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the newest compatible checkpoint of this name."),
                io.Image.Input("images", optional=True, tooltip="Images of the concept (IMAGE batch)."),
                io.String.Input("image_folder", default="", optional=True,
                                tooltip="Or a folder under ComfyUI's input/ with the concept images."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8, optional=True,
                             tooltip="Size the folder images are cropped/resized to."),
                io.Float.Input("weight_decay", default=1e-2, min=0.0, max=1.0, step=1e-3, optional=True,
                               tooltip="AdamW weight decay (CCE: 1e-2, np/concept_inversion.py:286)."),
                io.Int.Input("gradient_accumulation", default=4, min=1, max=256, optional=True,
                             tooltip="Micro-batches per optimiser step (CCE train.sh: 4)."),
                io.Combo.Input("sld_preset", options=["weak", "medium", "strong", "max"], default="max",
                               optional=True,
                               tooltip="sld: the SLD configuration to survive (CCE: max, "
                                       "sld/concept_inversion.py:410-414)."),
                io.Int.Input("sld_timestep_count", default=35, min=1, max=1000, optional=True,
                             tooltip="sld: timesteps per sample, momentum carried over them in descending "
                                     "order (CCE train.sh: 35)."),
                io.Int.Input("sld_timestep_range", default=90, min=1, max=1000, optional=True,
                             tooltip="sld: the timesteps are distinct, within a window of this many DDPM "
                                     "steps (CCE train.sh: 90)."),
            ],
            outputs=[
                sockets.Embedding.Output(display_name="EMBEDDING", tooltip="The learned vectors, for the loader node."),
                io.Image.Output(display_name="loss_plot", tooltip="Training loss per step."),
                io.String.Output(display_name="info", tooltip="Saved file, steps and final loss."),
            ],
            is_output_node=True,
            not_idempotent=False,
        )

    @classmethod
    def execute(cls, model, clip, vae, name, num_vectors, init_text, template, steps, learning_rate,
                batch_size, seed, objective, guidance_scale, negative_text, checkpoint_every,
                keep_checkpoints, preview_every, resume, images=None, image_folder="", resolution=512,
                weight_decay=1e-2, gradient_accumulation=4, sld_preset="max", sld_timestep_count=35,
                sld_timestep_range=90):
        emb, plot, info = inversion.train_concept_inversion(
            model, clip, vae, name=name, images=images, image_folder=image_folder, resolution=resolution,
            num_vectors=num_vectors, init_text=init_text, template=template, steps=steps,
            learning_rate=learning_rate, batch_size=batch_size, seed=seed, objective=objective,
            guidance_scale=guidance_scale, negative_text=negative_text, checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, preview_every=preview_every, resume=resume,
            weight_decay=weight_decay, gradient_accumulation=gradient_accumulation, sld_preset=sld_preset,
            sld_timestep_count=sld_timestep_count, sld_timestep_range=sld_timestep_range)
        return io.NodeOutput(emb, plot, info, ui=ui.PreviewText(info))


class LoadImplicitNegativeEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_LoadImplicitNegativeEmbedding",
            display_name="Load Implicit Negative Embedding",
            category="SafeGen/inversion",
            description=(
                "Encodes an implicit negative embedding (a file, an EMBEDDING from the trainer, or vectors stored "
                "in the workflow itself) with a CLIP into CONDITIONING for a sampler's negative or a "
                "safety-guidance node. Unlike the stock embedding: syntax, a width mismatch or NaN is an error, "
                "not silently ignored. embed_in_workflow stores the vectors (with the base-model hash and the "
                "source file name) in this node, so a shared workflow runs without the file."),
            inputs=[
                io.Clip.Input("clip", tooltip="CLIP of the model that will sample (SD1.x or SDXL)."),
                io.Combo.Input("embedding_name",
                               options=[inversion.FROM_INPUT, inversion.EMBEDDED] + inversion.embedding_files(),
                               tooltip="File in models/embeddings or the pack's embeddings/ folder; '(from input)' "
                                       "uses the EMBEDDING input; '(embedded in workflow)' the vectors stored in "
                                       "'embedded'."),
                io.String.Input("text", default="{}", multiline=True,
                                tooltip="Prompt around the embedding: {} marks where it goes (prepended if "
                                        "absent); add extra negative words here."),
                io.Float.Input("strength", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="Token weight of the embedding, as in (embedding:NAME:strength)."),
                sockets.Embedding.Input("embedding", optional=True, tooltip="EMBEDDING from Concept Inversion Trainer."),
                io.Boolean.Input("embed_in_workflow", default=False, optional=True,
                                 tooltip="On: after a run, the vectors are written into 'embedded' and the choice "
                                         "switches to '(embedded in workflow)' (needs the pack's web extension, "
                                         "loaded with the pack), so the saved workflow carries them."),
                io.String.Input("embedded", default="", multiline=True, optional=True,
                                tooltip="Vectors stored in the workflow (safegen-ine:v1:… — written by "
                                        "embed_in_workflow; a few KB)."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the MODEL that will sample; a warning names both hashes when the "
                                       "embedding was learned on another base model."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING", tooltip="Use as negative / safety concept."),
                sockets.Embedding.Output(display_name="EMBEDDING", tooltip="The embedding that was used."),
            ],
        )

    @classmethod
    def execute(cls, clip, embedding_name, text, strength, embedding=None, embed_in_workflow=False, embedded="",
                model=None):
        cond, emb, info, packed = inversion.ine_conditioning(clip, embedding_name, text, strength, embedding,
                                                             embedded, embed_in_workflow, model)
        out = {"text": info}
        if packed is not None:
            out[inversion.UI_EMBEDDED] = [packed]
        return io.NodeOutput(cond, emb, ui=out)


NODES = [ConceptInversionTrainer, LoadImplicitNegativeEmbedding]
