"""Concept inversion (INE / CCE) on a ComfyUI MODEL+CLIP, and implicit negative embeddings as
CONDITIONING. The objectives are ``safegen_core.inversion``'s."""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

import folder_paths

from ..safegen_core import inversion as inversion_core
from ..safegen_core.weights_io import (WeightFileError, read_weight_object, sanitize_name,
                                       save_safetensors_atomic, weights_fingerprint)
from . import common, compat, text, training

log = logging.getLogger("safegen")

OBJECTIVES = inversion_core.OBJECTIVES
PACK_EMBEDDINGS = os.path.join(common.PACK_ROOT, "embeddings")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EMBEDDING_EXT = (".safetensors", ".pt", ".bin")
FROM_INPUT = "(from input)"
EMBEDDED = "(embedded in workflow)"
UI_EMBEDDED = "safegen_embedded"  # executed-message key the web extension writes into the node's widget


def register_folders() -> None:
    """The pack's embeddings/ folder is an extra embeddings path (stock `embedding:` sees it too)."""
    if os.path.isdir(PACK_EMBEDDINGS) and PACK_EMBEDDINGS not in folder_paths.get_folder_paths("embeddings"):
        folder_paths.add_model_folder_path("embeddings", PACK_EMBEDDINGS)


def embedding_files() -> list[str]:
    register_folders()
    return common.files_in("embeddings", EMBEDDING_EXT)


def load_folder_images(folder: str, resolution: int) -> torch.Tensor:
    """Images under ComfyUI's input/<folder>, centre-cropped and resized: IMAGE [B,H,W,3]."""
    from PIL import Image, ImageOps

    path = common.input_path(folder, "image_folder")
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


def model_fingerprint(trainable_model) -> str:
    """Content hash of a loaded trainable clone's effective UNet weights (the input MODEL's patches
    applied; training wrappers do not change the stored weights). Computed on the clone, which is never
    a streaming (dynamic-VRAM) patcher."""
    return weights_fingerprint(compat.unet(trainable_model).state_dict())


def init_token_vectors(clip, init_text: str) -> dict[str, torch.Tensor]:
    """Input-embedding rows of the init text's tokens, per encoder."""
    out = {}
    for enc in text.encoders(clip):
        ids = text.token_ids(clip, enc, init_text)
        if not ids:
            raise ValueError(f"init_text '{init_text}' gives no tokens")
        out[enc] = compat.input_embedding_rows(clip, enc, ids)
    return out


TEMPLATE_SETS = {f"cce:{k}": v for k, v in inversion_core.CCE_TEMPLATES.items()}
DEFAULT_TEMPLATE = "cce:object"


def training_templates(template: str, objective: str = "ldm") -> list[str]:
    """The prompts one sample's template is drawn from: ``cce:object`` / ``cce:style`` / ``cce:person``
    (CCE's lists, np/concept_inversion.py:422-477), or one template per line, each with ``{}`` where the
    embedding goes (a line without ``{}`` gets it prepended)."""
    key = template.strip()
    if key in TEMPLATE_SETS:
        if key == "cce:person" and objective == "sld":
            return list(inversion_core.CCE_PERSON_TEMPLATES_SLD)
        return list(TEMPLATE_SETS[key])
    lines = [ln.strip() for ln in template.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"template is empty: give one of {', '.join(TEMPLATE_SETS)} or prompts with {{}}")
    return lines


def invert(model, clip, latents, *, name="ine_concept", num_vectors=1, init_text="person",
           template=DEFAULT_TEMPLATE, steps=3000, learning_rate=5e-3, batch_size=1, seed=0, objective="ldm",
           guidance_scale=7.5, negative_text="", checkpoint_every=0, keep_checkpoints=2, preview_every=0,
           resume=False, vae=None, init_vectors=None, sess: training.Session | None = None,
           model_hash: str | None = None, weight_decay=0.0, gradient_accumulation=1, sld_preset="max",
           sld_timestep_count=35, sld_timestep_range=90):
    """Concept inversion on ``latents`` (model space, [B,4,h,w]); returns (TrainResult, fingerprint).

    Objectives (``safegen_core.inversion``): ``ldm`` — the denoising loss on this model (INE);
    ``np`` / ``sld`` — CCE's: the prediction under the defence (negative prompt / SLD with ``sld_preset``)
    must equal the undefended CFG prediction of ``negative_text`` (the safety concept). ``sld`` uses one
    image per micro-batch at ``sld_timestep_count`` sorted timesteps, as CCE.

    ``sess``: an open :func:`training.session` holding trainable clones of ``model``/``clip`` (Dark Miner
    mines in its own session); otherwise one is opened here. ``model_hash``: the hash of the model's
    weights when the caller has it (Dark Miner hashes once per run), else computed on the clone."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; one of {', '.join(OBJECTIVES)}")
    cce = objective in ("np", "sld")
    if cce and not negative_text.strip():
        raise ValueError(f"objective '{objective}' needs negative_text: the safety concept the defence uses "
                         f"(CCE's --safety_concept)")
    if objective == "sld" and batch_size != 1:
        raise ValueError("objective 'sld' takes one image per micro-batch (CCE: train_batch_size 1, "
                         "sld/concept_inversion.py:1005); raise gradient_accumulation instead")
    sld_settings = None
    if objective == "sld":
        from ..safegen_core.sld import SLD_PRESETS
        if sld_preset not in SLD_PRESETS:
            raise ValueError(f"unknown sld_preset {sld_preset!r}; one of {', '.join(SLD_PRESETS)}")
        p = SLD_PRESETS[sld_preset]
        sld_settings = inversion_core.CCESLDSettings(
            guidance_scale=guidance_scale, sld_warmup_steps=0, sld_guidance_scale=p.guidance_scale,
            sld_threshold=p.threshold, sld_momentum_scale=p.momentum_scale, sld_mom_beta=p.momentum_beta)
        if not 1 <= sld_timestep_count <= sld_timestep_range:
            raise ValueError(f"sld_timestep_count {sld_timestep_count} must be between 1 and sld_timestep_range "
                             f"{sld_timestep_range}")
    templates = training_templates(template, objective)
    widths = text.embedding_widths(clip)
    fingerprint = {"model": model_hash, "num_vectors": num_vectors, "init_text": init_text,
                   "template": template, "batch_size": batch_size, "objective": objective,
                   "images": int(latents.shape[0]),
                   "guidance_scale": guidance_scale if cce else None,
                   "negative_text": negative_text if cce else None}
    if objective == "sld":
        fingerprint["sld"] = {"preset": sld_preset, "count": sld_timestep_count, "range": sld_timestep_range}
    with torch.inference_mode(False):
        if init_vectors is None:
            init = init_token_vectors(clip, init_text)
            params = {enc: inversion_core.init_vectors(init[enc], num_vectors) for enc in widths}
        else:
            params = {enc: init_vectors[enc].detach().clone().float() for enc in widths}
        latents = latents.detach().clone()
        h, w = latents.shape[-2:]
        sigmas = common.model_sigmas(model)
        owned = sess is None
        ctx = training.session(model, clip) if owned else contextlib.nullcontext(sess)
        with ctx as s:
            if fingerprint["model"] is None:
                fingerprint["model"] = model_fingerprint(s.model)
            spliced = [text.tokenize_with_vectors(s.clip, text.prompt_with_embedding(t), params) for t in templates]
            neg = unc = None
            if cce:
                with torch.no_grad():
                    neg = text.encode_tokens(s.clip, s.clip.tokenize(negative_text))
                    unc = text.encode_tokens(s.clip, s.clip.tokenize(""))

            def cond_for(picks):
                """Per sample: its template's encoding with the current vectors (each template encoded once)."""
                enc = {i: text.encode_tokens(s.clip, spliced[i].with_vectors(params)) for i in sorted(set(picks))}
                cond = torch.cat([enc[i][0] for i in picks])
                pooled = None if enc[picks[0]][1] is None else torch.cat([enc[i][1] for i in picks])
                return cond, pooled

            def frozen(c, x, sigma):
                with torch.no_grad():
                    n = x.shape[0]
                    return compat.predict_eps(s.model, x, sigma, c[0].expand(n, -1, -1),
                                              None if c[1] is None else c[1].expand(n, -1), w, h)

            def loss_fn(step, g):
                if objective == "sld":
                    x, sigma, _eps, _i, _ts = inversion_core.cce_sld_sample(latents, sigmas, g, sld_timestep_range,
                                                                          sld_timestep_count)
                    pick = int(torch.randint(len(templates), (1,), generator=g))
                    cond, pooled = cond_for([pick] * x.shape[0])
                    e_c = compat.predict_eps(s.model, x, sigma, cond, pooled, w, h)
                    e_s, e_u = frozen(neg, x, sigma), frozen(unc, x, sigma)
                    return inversion_core.inversion_loss("sld", None, e_c.split(1), e_s.split(1), guidance_scale,
                                                         eps_uncond=e_u.split(1), sld=sld_settings)
                x, sigma, eps, _ = inversion_core.sample_batch(latents, sigmas, batch_size, g)
                picks = torch.randint(len(templates), (batch_size,), generator=g).tolist()
                cond, pooled = cond_for(picks)
                e_c = compat.predict_eps(s.model, x, sigma, cond, pooled, w, h)
                if objective == "np":
                    return inversion_core.inversion_loss("np", eps, e_c, frozen(neg, x, sigma), guidance_scale,
                                                         eps_uncond=frozen(unc, x, sigma))
                return inversion_core.inversion_loss("ldm", eps, e_c)

            def on_preview(step):
                with torch.no_grad():
                    pos = text.encode(s.clip, text.prompt_with_embedding(templates[0]),
                                      {k: v.detach() for k, v in params.items()})
                    neg_p = text.encode(s.clip, "")
                    img = common.sample_preview(s.model, vae, pos, neg_p, seed, steps=8, width=w * 8, height=h * 8)
                return common.image_to_pil(img)

            result = training.run(params, loss_fn, steps=steps, lr=learning_rate, seed=seed, optimizer="adamw",
                                  checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                                  preview_every=preview_every, on_preview=on_preview if vae is not None else None,
                                  kind="inversion", name=name, resume=resume, fingerprint=fingerprint,
                                  weight_decay=weight_decay, grad_accum=gradient_accumulation)
    return result, fingerprint


def train_concept_inversion(model, clip, vae, *, name, images=None, image_folder="", resolution=512, **settings):
    """The Concept Inversion Trainer: (EMBEDDING, loss plot, info). Saves
    models/embeddings/<name>.safetensors (usable as embedding:<name>)."""
    name = sanitize_name(name, "ine_concept")
    if images is None:
        if not image_folder:
            raise ValueError("Concept Inversion Trainer needs images: connect an IMAGE batch or set image_folder")
        images = load_folder_images(image_folder, resolution)
    latents = common.encode_images(model, vae, images)
    result, fingerprint = invert(model, clip, latents, name=name, vae=vae, **settings)
    model_hash = fingerprint["model"]
    steps = settings.get("steps", 3000)
    vectors = result.params
    final = result.losses[-1] if result.losses else float("nan")
    meta = {"safegen_kind": "implicit_negative_embedding", "base_model_hash": model_hash,
            "unlearned_file": model.model_options.get("safegen_unlearned") or "",
            "objective": settings.get("objective", "ldm"), "steps": steps, "lr": settings.get("learning_rate"),
            "num_vectors": settings.get("num_vectors", 1), "init_text": settings.get("init_text"),
            "template": settings.get("template"), "batch_size": settings.get("batch_size"),
            "weight_decay": settings.get("weight_decay"), "gradient_accumulation": settings.get("gradient_accumulation"),
            "seed": settings.get("seed"), "final_loss": final,
            "loss_mean_last_10pct": float(np.mean(result.losses[-max(1, len(result.losses) // 10):]))
            if result.losses else None}
    path = os.path.join(folder_paths.get_folder_paths("embeddings")[0], f"{name}.safetensors")
    save_safetensors_atomic(inversion_core.to_file_tensors(vectors), path, meta)
    plot = common.loss_plot_image(result.losses, f"inversion loss: {name}")
    info = (f"saved {path}\nsteps {steps} (resumed from {result.resumed_from}), final loss {final:.5f}, "
            f"vectors {meta['num_vectors']}, objective {meta['objective']}")
    return {"name": name, "file": os.path.basename(path), "vectors": vectors, "metadata": meta}, plot, info


def read_embedding_file(name: str) -> dict:
    path = folder_paths.get_full_path("embeddings", name)
    if path is None:
        raise ValueError(f"embedding '{name}' not found in models/embeddings or the pack's embeddings/ folder")
    fname = os.path.basename(path)
    try:
        obj, meta, _ = read_weight_object(path)
    except WeightFileError as e:
        raise ValueError(str(e)) from e
    return {"name": os.path.splitext(fname)[0], "file": fname,
            "vectors": inversion_core.from_file_object(obj, fname), "metadata": meta}


def checked_vectors(clip, embedding: dict) -> dict[str, torch.Tensor]:
    """The embedding's vectors for this CLIP's encoders; a width mismatch, NaN or vectors for an encoder
    this CLIP lacks is an error naming the file."""
    widths = text.embedding_widths(clip)
    inversion_core.check_embedding(embedding["vectors"], widths,
                                   embedding.get("file") or embedding.get("name", "embedding"))
    return {k: v for k, v in embedding["vectors"].items() if k in widths}


def embedding_from_text(packed: str) -> dict:
    vectors, meta = inversion_core.unpack_embedding(packed, "embedded INE")
    src = meta.get("source_file") or meta.get("name") or "embedded"
    return {"name": os.path.splitext(src)[0], "file": f"embedded INE ({src})", "vectors": vectors, "metadata": meta}


def check_base_model(embedding: dict, model) -> str | None:
    """A warning naming both hashes when the embedding was learned on another base model than ``model``."""
    want = (embedding.get("metadata") or {}).get("base_model_hash")
    if not want or model is None:
        return None
    have = weights_fingerprint(compat.unet(model).state_dict())
    if have == want:
        return None
    msg = (f"{embedding.get('file') or embedding.get('name')}: learned on a base model with hash {want}, but the "
           f"connected MODEL has hash {have}; the embedding may not steer this model")
    log.warning("SafeGen: %s", msg)
    return msg


def ine_conditioning(clip, embedding_name: str, prompt: str, strength: float, embedding: dict | None = None,
                     embedded: str = "", embed_in_workflow: bool = False, model=None):
    """Load Implicit Negative Embedding: (CONDITIONING, EMBEDDING, info lines, packed string or None)."""
    if embedding_name == EMBEDDED:
        embedding = embedding_from_text(embedded)
    elif embedding_name != FROM_INPUT:
        embedding = read_embedding_file(embedding_name)
    elif embedding is None:
        raise ValueError("Load Implicit Negative Embedding: choose a file or connect an EMBEDDING")
    vec = checked_vectors(clip, embedding)
    shapes = ", ".join(f"clip_{k} {tuple(v.shape)}" for k, v in vec.items())
    info = [f"{embedding.get('file') or embedding.get('name')}: {shapes}"]
    warn = check_base_model(embedding, model)
    if warn:
        info.append("WARNING: " + warn)
    packed = None
    if embed_in_workflow:
        meta = dict(embedding.get("metadata") or {})
        meta.setdefault("source_file", embedding.get("file") or embedding.get("name", ""))
        packed = inversion_core.pack_embedding(embedding["vectors"], meta)
        info.append(f"vectors embedded in the workflow ({len(packed)} characters); save the workflow to share it "
                    f"without the file")
    return text.encode(clip, text.prompt_with_embedding(prompt, strength), vec), embedding, info, packed
