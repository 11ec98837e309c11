"""Concept Inversion Trainer and Load Implicit Negative Embedding (INE).

The trainer learns, on the MODEL/CLIP/VAE it is given (the loaded unlearned model, through
ComfyUI's model management), token vectors that still make that model produce the concept.
The loader turns such vectors into CONDITIONING for a sampler's negative or a guidance node.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io, ui

from ..safegen_core import inversion as INV
from ..safegen_core.training import TrainCallbacks, TrainConfig, train
from ..safegen_core.weights_io import (WeightFileError, read_weight_file, sanitize_name,
                                       save_safetensors_atomic)
from . import comfy_glue as G

log = logging.getLogger("safegen")

Embedding = io.Custom("EMBEDDING")
PACK_EMBEDDINGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "embeddings")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def register_folders() -> None:
    """The pack's embeddings/ folder is an extra embeddings path (stock `embedding:` sees it too)."""
    if os.path.isdir(PACK_EMBEDDINGS) and PACK_EMBEDDINGS not in folder_paths.get_folder_paths("embeddings"):
        folder_paths.add_model_folder_path("embeddings", PACK_EMBEDDINGS)


register_folders()


def embedding_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list("embeddings")
            if f.lower().endswith((".safetensors", ".pt", ".bin"))]


def load_folder_images(folder: str, resolution: int) -> torch.Tensor:
    """Images under ComfyUI's input/<folder>, centre-cropped and resized: IMAGE [B,H,W,3]."""
    from PIL import Image, ImageOps

    path = G.input_path(folder, "image_folder")
    if not os.path.isdir(path):
        raise ValueError(f"image_folder '{folder}' is not a folder under ComfyUI's input directory")
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXT))
    if not files:
        raise ValueError(f"image_folder '{folder}' holds no images ({', '.join(IMAGE_EXT)})")
    out = []
    for f in files:
        im = ImageOps.exif_transpose(Image.open(os.path.join(path, f))).convert("RGB")
        im = ImageOps.fit(im, (resolution, resolution), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0))
    return torch.stack(out)


def model_fingerprint(model) -> str:
    """Content hash of the MODEL's effective UNet weights (patches applied), cheap to compute."""
    mm.load_models_gpu([model], force_full_load=True)
    return G.weights_fingerprint(model.model.diffusion_model.state_dict())


def init_token_vectors(clip, text: str) -> dict[str, torch.Tensor]:
    """Input-embedding rows of the init text's tokens, per encoder."""
    out = {}
    for enc, tok in G.encoders_of(clip).items():
        ids = [int(t[0]) for t in tok.tokenize_with_weights(text)[0]
               if isinstance(t[0], int) and t[0] not in (tok.start_token, tok.end_token, tok.pad_token)]
        cm = getattr(clip.cond_stage_model, f"clip_{enc}")
        table = cm.transformer.get_input_embeddings().weight
        if not ids:
            raise ValueError(f"init_text '{text}' gives no tokens")
        out[enc] = table[torch.tensor(ids)].detach().float().cpu().clone()
    return out


def invert(model, clip, latents, *, name="ine_concept", num_vectors=1, init_text="person", template="{}",
           steps=500, learning_rate=5e-3, batch_size=1, seed=0, objective="ldm", guidance_scale=7.5,
           negative_text="", checkpoint_every=0, keep_checkpoints=2, preview_every=0, resume=False, vae=None,
           init_vectors=None):
    """Run concept inversion on ``latents`` (model space, [B,4,h,w]); returns (TrainResult, fingerprint)."""
    widths = G.embedding_widths(clip)
    cfg = TrainConfig(steps=steps, lr=learning_rate, seed=seed, optimizer="adamw",
                      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                      preview_every=preview_every)
    fingerprint = {"model": model_fingerprint(model), "num_vectors": num_vectors, "init_text": init_text,
                   "template": template, "batch_size": batch_size, "objective": objective,
                   "images": int(latents.shape[0]),
                   "guidance_scale": guidance_scale if objective == "guided" else None,
                   "negative_text": negative_text if objective == "guided" else None}
    with torch.inference_mode(False):
        if init_vectors is None:
            init = init_token_vectors(clip, init_text)
            params = {enc: INV.init_vectors(init[enc], num_vectors) for enc in widths}
        else:
            params = {enc: init_vectors[enc].detach().clone().float() for enc in widths}
        latents = latents.detach().clone()
        text = G.prompt_with_embedding(template)
        h, w = latents.shape[-2:]
        sigmas = G.model_sigmas(model)
        progress = G.Progress(steps)
        with G.trainable(model, clip.patcher):
            neg_cond = neg_pooled = None
            if objective == "guided":
                with torch.no_grad():
                    neg_cond, neg_pooled = clip.encode_from_tokens(clip.tokenize(negative_text), return_pooled=True)

            def loss_fn(step, g):
                x, sigma, eps, _ = INV.sample_batch(latents, sigmas, batch_size, g)
                cond, pooled = G.encode_for_training(clip, text, params)
                e_c = G.predict_eps(model, x, sigma, cond, pooled, w, h)
                e_n = None
                if objective == "guided":
                    with torch.no_grad():
                        e_n = G.predict_eps(model, x, sigma, neg_cond, neg_pooled, w, h)
                return INV.inversion_loss(objective, eps, e_c, e_n, guidance_scale)

            def on_preview(step):
                with torch.no_grad():
                    pos = G.encode(clip, text, {k: v.detach() for k, v in params.items()})
                    neg = G.encode(clip, "")
                    img = G.sample_preview(model, vae, pos, neg, seed, steps=8, width=w * 8, height=h * 8)
                progress.preview = G.image_to_pil(img)

            result = train(params, loss_fn, cfg,
                           TrainCallbacks(on_step=lambda s, n, l: progress.step(s, l),
                                          check_interrupt=mm.throw_exception_if_processing_interrupted,
                                          on_preview=on_preview if (preview_every > 0 and vae is not None) else None),
                           ckpt_dir=G.checkpoint_dir("inversion", name) if (checkpoint_every or resume) else None,
                           resume=resume, fingerprint=fingerprint)
    return result, fingerprint


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
                io.String.Input("template", default="{}",
                                tooltip="Training prompt; {} is where the embedding goes (e.g. 'a photo of {}')."),
                io.Int.Input("steps", default=500, min=1, max=100000,
                             tooltip="Optimisation steps (INE paper: 3000; CCE: 1000–5000)."),
                io.Float.Input("learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4,
                               tooltip="AdamW learning rate (INE/CCE: 5e-3)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step (INE: 1)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the timestep/noise draws (a resumed run follows the same path)."),
                io.Combo.Input("objective", options=list(INV.OBJECTIVES), default="ldm",
                               tooltip="ldm: plain denoising loss on the model (INE). guided: the CFG-guided "
                                       "prediction with negative_text as negative must match (CCE, for models "
                                       "defended by a negative prompt)."),
                io.Float.Input("guidance_scale", default=7.5, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale of the guided objective."),
                io.String.Input("negative_text", default="", multiline=True,
                                tooltip="Negative prompt of the guided objective (the defence to survive)."),
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
            ],
            outputs=[
                Embedding.Output(display_name="EMBEDDING", tooltip="The learned vectors, for the loader node."),
                io.Image.Output(display_name="loss_plot", tooltip="Training loss per step."),
                io.String.Output(display_name="info", tooltip="Saved file, steps and final loss."),
            ],
            is_output_node=True,
            not_idempotent=False,
        )

    @classmethod
    def execute(cls, model, clip, vae, name, num_vectors, init_text, template, steps, learning_rate,
                batch_size, seed, objective, guidance_scale, negative_text, checkpoint_every,
                keep_checkpoints, preview_every, resume, images=None, image_folder="", resolution=512):
        name = sanitize_name(name, "ine_concept")
        if images is None:
            if not image_folder:
                raise ValueError("Concept Inversion Trainer needs images: connect an IMAGE batch or set image_folder")
            images = load_folder_images(image_folder, resolution)
        latents = model.model.process_latent_in(vae.encode(images[:, :, :, :3]).float())
        with torch.inference_mode(False):
            latents = latents.clone()  # a normal tensor (prompts run in inference mode)
        result, fingerprint = invert(model, clip, latents, name=name, num_vectors=num_vectors, init_text=init_text,
                                     template=template, steps=steps, learning_rate=learning_rate,
                                     batch_size=batch_size, seed=seed, objective=objective,
                                     guidance_scale=guidance_scale, negative_text=negative_text,
                                     checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                                     preview_every=preview_every, resume=resume, vae=vae)
        fp_model = fingerprint["model"]
        unlearned = model.model_options.get("safegen_unlearned") or ""
        vectors = result.params
        final = result.losses[-1] if result.losses else float("nan")
        meta = {"safegen_kind": "implicit_negative_embedding", "base_model_hash": fp_model,
                "unlearned_file": unlearned, "objective": objective, "steps": steps, "lr": learning_rate,
                "num_vectors": num_vectors, "init_text": init_text, "template": template,
                "batch_size": batch_size, "seed": seed, "final_loss": final,
                "loss_mean_last_10pct": float(np.mean(result.losses[-max(1, len(result.losses) // 10):]))
                if result.losses else None}
        path = os.path.join(folder_paths.get_folder_paths("embeddings")[0], f"{name}.safetensors")
        save_safetensors_atomic(INV.to_file_tensors(vectors), path, meta)
        plot = G.loss_plot_image(result.losses, f"inversion loss: {name}")
        info = (f"saved {path}\nsteps {steps} (resumed from {result.resumed_from}), final loss {final:.5f}, "
                f"vectors {num_vectors}, objective {objective}")
        emb = {"name": name, "vectors": vectors, "metadata": meta}
        return io.NodeOutput(emb, plot, info, ui=ui.PreviewText(info))


def read_embedding_file(name: str) -> dict:
    path = folder_paths.get_full_path("embeddings", name)
    if path is None:
        raise ValueError(f"embedding '{name}' not found in models/embeddings or the pack's embeddings/ folder")
    try:
        wf = read_weight_file(path)
    except WeightFileError as e:
        raise ValueError(str(e)) from e
    return {"name": os.path.splitext(os.path.basename(name))[0],
            "vectors": INV.from_file_tensors(wf.tensors, os.path.basename(path)), "metadata": wf.metadata}


class LoadImplicitNegativeEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_LoadImplicitNegativeEmbedding",
            display_name="Load Implicit Negative Embedding",
            category="SafeGen/inversion",
            description=(
                "Encodes an implicit negative embedding (a file or an EMBEDDING from the trainer) with a CLIP "
                "into CONDITIONING for a sampler's negative or a safety-guidance node. Unlike the stock "
                "embedding: syntax, a width mismatch or NaN is an error, not silently ignored."),
            inputs=[
                io.Clip.Input("clip", tooltip="CLIP of the model that will sample (SD1.x or SDXL)."),
                io.Combo.Input("embedding_name", options=["(from input)"] + embedding_files(),
                               tooltip="File in models/embeddings or the pack's embeddings/ folder; "
                                       "'(from input)' uses the EMBEDDING input."),
                io.String.Input("text", default="{}", multiline=True,
                                tooltip="Prompt around the embedding: {} marks where it goes (prepended if "
                                        "absent); add extra negative words here."),
                io.Float.Input("strength", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="Token weight of the embedding, as in (embedding:NAME:strength)."),
                Embedding.Input("embedding", optional=True, tooltip="EMBEDDING from Concept Inversion Trainer."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING", tooltip="Use as negative / safety concept."),
                Embedding.Output(display_name="EMBEDDING", tooltip="The embedding that was used."),
            ],
        )

    @classmethod
    def execute(cls, clip, embedding_name, text, strength, embedding=None):
        if embedding_name != "(from input)":
            embedding = read_embedding_file(embedding_name)
        elif embedding is None:
            raise ValueError("Load Implicit Negative Embedding: choose a file or connect an EMBEDDING")
        label = embedding.get("name", "embedding")
        INV.check_embedding(embedding["vectors"], G.embedding_widths(clip), label)
        vec = {k: v for k, v in embedding["vectors"].items() if k in G.embedding_widths(clip)}
        cond = G.encode(clip, G.prompt_with_embedding(text, strength), vec)
        return io.NodeOutput(cond, embedding)


NODES = [ConceptInversionTrainer, LoadImplicitNegativeEmbedding]
