"""ESD Concept Eraser and Dark Miner Eraser: train concept-erased UNet weights inside a prompt.

Graph glue only; the science is in ``safegen_core.esd`` and ``safegen_core.darkminer``.

How training touches the model (both nodes):
* The selected UNet tensors (ESD variant x / u / x-strict) get *delta* tensors (zeros, float32,
  the only trainable tensors). Under ``comfy_glue.trainable`` the UNet's own weights are frozen
  aliases; each selected module gets an extra entry in ComfyUI's per-module
  ``weight_function``/``bias_function`` list computing ``w + delta`` (the hook that
  ``ModelPatcher.add_weight_wrapper`` uses). The frozen original θ0 is the same module with the
  entry switched off — so no copy of the UNet and no copy of the selected tensors is kept, and
  the stored weights are never written: the cached base MODEL cannot be poisoned. The hook
  entries and the aliases are removed in ``finally`` (also on cancel or error).
* Output MODEL = the input MODEL cloned, with the learned differences as ModelPatcher ``diff``
  patches. The saved file (``models/diffusion_models/<name>.safetensors``) holds the
  *replacement* tensors θ0 + Δ of the trained keys in LDM names (``model.diffusion_model.*``):
  a partial file the Unlearned UNet Loader reads, which at strength 1 on the same base MODEL
  reproduces the eraser's MODEL. Metadata: method, concept, variant, steps, η, lr, seed, base
  model hash (effective UNet weights of the input MODEL, patches included) and the rest of the
  settings.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass

import torch

import comfy.model_management as mm
import comfy.sample
import folder_paths
from comfy_api.latest import io, ui

from ..safegen_core import darkminer as DM
from ..safegen_core import esd as ESD
from ..safegen_core.training import TrainCallbacks, TrainConfig, train
from ..safegen_core.weights_io import (WeightFileError, read_weight_file, sanitize_name,
                                       save_safetensors_atomic)
from . import comfy_glue as G
from .inversion import Embedding, init_token_vectors, invert, model_fingerprint

log = logging.getLogger("safegen")

FOLDER = "diffusion_models"
UNET = "diffusion_model."
FILE_PREFIX = "model.diffusion_model."
KIND = "unlearned_unet_partial"
CATEGORY = "SafeGen/unlearning"


@dataclass
class Session:
    model: object
    clip: object
    unet: torch.nn.Module
    keys: list
    deltas: dict
    hooks: G.DeltaHooks
    width: int    # latent width
    height: int   # latent height

    def eps(self, x, sigma, cond, erased):
        """ε of the erased (θ0 + Δ) or original (θ0) model at x = x0 + σ·ε."""
        prev = self.hooks.enabled
        self.hooks.enabled = bool(erased)
        try:
            dev = self.model.load_device
            c, p = cond
            out = G.predict_eps(self.model, x.to(dev), sigma.to(dev), c.to(dev),
                                None if p is None else p.to(dev), self.width, self.height)
            return out.to(x.device)
        finally:
            self.hooks.enabled = prev

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The selected tensors as they are in the loaded model (θ0, patches of the input MODEL
        applied) — aliases, not copies."""
        params = dict(self.unet.named_parameters())
        return {k: params[k].detach() for k in self.keys}


@contextlib.contextmanager
def erasure_session(model, clip, variant: str, width: int, height: int):
    """Load MODEL/CLIP for autograd, select the variant's tensors, install zero deltas."""
    with torch.inference_mode(False):
        with G.trainable(model, clip.patcher):
            unet = model.model.diffusion_model
            keys = ESD.select_parameters(unet, variant)
            params = dict(unet.named_parameters())
            deltas = {k: torch.zeros(params[k].shape, dtype=torch.float32, device=params[k].device)
                      for k in keys}
            with G.DeltaHooks(unet, deltas) as hooks:
                yield Session(model, clip, unet, keys, deltas, hooks, width, height)


def text_cond(clip, text: str, vectors: dict | None = None):
    """(cond, pooled) as normal (non-inference) tensors, no autograd."""
    with torch.inference_mode(False), torch.no_grad():
        if vectors is None:
            cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        else:
            cond, pooled = G.encode_for_training(clip, text, {k: v.detach() for k, v in vectors.items()})
        return cond.detach().clone(), (None if pooled is None else pooled.detach().clone())


def patched_model(model, patches: dict[str, torch.Tensor], file_name: str):
    """The input MODEL cloned with the learned differences as ``diff`` patches."""
    m = model.clone()
    added = m.add_patches({UNET + k: ("diff", (v,)) for k, v in patches.items()}, 1.0)
    if len(added) != len(patches):
        miss = sorted(set(UNET + k for k in patches) - set(added))
        raise ValueError(f"{len(miss)} trained key(s) are not in the MODEL: {miss[:5]}")
    m.model_options["safegen_unlearned"] = file_name
    return m


def output_folder() -> str:
    """models/diffusion_models (ComfyUI lists the legacy models/unet first for the same key)."""
    paths = folder_paths.get_folder_paths(FOLDER)
    named = [p for p in paths if os.path.basename(os.path.normpath(p)) == FOLDER]
    return (named or paths)[0]


def save_unlearned(name: str, targets: dict[str, torch.Tensor], meta: dict) -> str:
    path = os.path.join(output_folder(), f"{name}.safetensors")
    save_safetensors_atomic({FILE_PREFIX + k: v for k, v in targets.items()}, path, meta)
    return path


def latent_size(model, resolution: int) -> tuple[int, int, int]:
    """(channels, h, w) of the latent for a square image of ``resolution`` pixels."""
    ch = int(getattr(model.model.latent_format, "latent_channels", 4))
    s = max(1, int(resolution) // 8)
    return ch, s, s


def check_concept(concept: str, node: str) -> str:
    c = (concept or "").strip()
    if not c:
        raise ValueError(f"{node}: concept is empty ({concept!r}); write the concept to erase, e.g. 'nudity'")
    return c


def _preview_cb(session: Session, vae, text: str, seed: int, progress, resolution: int):
    if vae is None:
        return None

    def on_preview(step):
        with torch.no_grad():
            pos, neg = G.encode(session.clip, text), G.encode(session.clip, "")
            img = G.sample_preview(session.model, vae, pos, neg, seed, steps=8, width=resolution,
                                   height=resolution)
        progress.preview = G.image_to_pil(img)
    return on_preview


# --------------------------------------------------------------------------- ESD
def esd_erase(model, clip, concept, *, variant="x", eta=1.0, steps=200, learning_rate=5e-5, seed=0,
              sampling_steps=50, start_guidance=3.0, resolution=512, xt_sampler="erased", checkpoint_every=0,
              keep_checkpoints=2, preview_every=0, resume=False, name="esd_concept", vae=None):
    """Run ESD; returns dict(result, keys, targets, patches, fingerprint)."""
    concept = check_concept(concept, "ESD Concept Eraser")
    variant = ESD.check_variant(variant)
    if xt_sampler not in ESD.XT_SAMPLERS:
        raise ValueError(f"unknown xt_sampler {xt_sampler!r}; one of {ESD.XT_SAMPLERS}")
    ch, h, w = latent_size(model, resolution)
    cfg = TrainConfig(steps=steps, lr=learning_rate, seed=seed, optimizer="adam",
                      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                      preview_every=preview_every)
    fingerprint = {"method": "esd", "model": model_fingerprint(model), "concept": concept, "variant": variant,
                   "eta": eta, "sampling_steps": sampling_steps, "start_guidance": start_guidance,
                   "latent": [ch, h, w], "xt_sampler": xt_sampler}
    with erasure_session(model, clip, variant, w, h) as s:
        c_concept, c_null = text_cond(clip, concept), text_cond(clip, "")
        sigmas = ESD.ddim_sigmas(G.model_sigmas(model), sampling_steps)
        loss_fn = ESD.make_esd_loss_fn(s.eps, c_concept, c_null, sigmas, [1, ch, h, w], eta=eta,
                                       start_guidance=start_guidance, xt_sampler=xt_sampler)
        progress = G.Progress(steps, "ESD loss")
        result = train(s.deltas, loss_fn, cfg,
                       TrainCallbacks(on_step=lambda st, n, lv: progress.step(st, lv),
                                      check_interrupt=mm.throw_exception_if_processing_interrupted,
                                      on_preview=_preview_cb(s, vae, concept, seed, progress, resolution)),
                       ckpt_dir=G.checkpoint_dir("esd", name) if (checkpoint_every or resume) else None,
                       resume=resume, fingerprint=fingerprint)
        s.hooks.check()
        targets, patches = ESD.replacement_and_patch(s.base_weights(), result.params)
        keys = list(s.keys)
    return {"result": result, "keys": keys, "targets": targets, "patches": patches,
            "fingerprint": fingerprint}


def _meta(method: str, fp: dict, extra: dict) -> dict:
    meta = {"safegen_kind": KIND, "method": method, "base_model_hash": fp["model"],
            "layout": "LDM names, replacement tensors (base + learned difference) of the trained keys only"}
    meta.update(extra)
    return meta


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
                "returns the erased MODEL."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to erase the concept from (SD1.x tested)."),
                io.Clip.Input("clip",
                              tooltip="The CLIP of that model (encodes the concept and the empty prompt)."),
                io.String.Input("concept", default="nudity", tooltip="The concept to erase, as a prompt."),
                io.Combo.Input("variant", options=list(ESD.VARIANTS), default="x",
                               tooltip="Which weights train. x: cross-attention (attn2; for named objects, "
                                       "styles); u: every Linear/Conv2d except cross-attention (for global "
                                       "concepts like nudity); x-strict: attn2.to_k/to_v only."),
                io.Float.Input("eta", default=1.0, min=0.0, max=20.0, step=0.1,
                               tooltip="η, the negative guidance of the target (paper: 1; the newer "
                                       "esd_sd.py's negative_guidance 2 equals η 1 here)."),
                io.Int.Input("steps", default=200, min=1, max=100000,
                             tooltip="Training iterations (reference: 200; paper nudity ESD-u: 1000)."),
                io.Float.Input("learning_rate", default=5e-5, min=1e-8, max=1.0, step=1e-6,
                               tooltip="Adam learning rate (reference esd_sd.py: 5e-5; paper: 1e-5)."),
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
                io.Combo.Input("xt_sampler", options=list(ESD.XT_SAMPLERS), default="erased",
                               tooltip="Which weights sample x_t: erased (the model being trained, as in "
                                       "the original CompVis code) or original (the frozen model, as in "
                                       "esd_sd.py)."),
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
        name = sanitize_name(name, "esd_concept")
        out = esd_erase(model, clip, concept, variant=variant, eta=eta, steps=steps,
                        learning_rate=learning_rate, seed=seed, sampling_steps=sampling_steps,
                        start_guidance=start_guidance, resolution=resolution, xt_sampler=xt_sampler,
                        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                        preview_every=preview_every, resume=resume, name=name, vae=vae)
        res, fp = out["result"], out["fingerprint"]
        losses = res.losses
        final = losses[-1] if losses else float("nan")
        win = max(1, len(losses) // 10)
        meta = _meta("ESD", fp, {
            "concept": fp["concept"], "variant": f"esd-{fp['variant']}", "steps": steps, "eta": eta,
            "lr": learning_rate, "seed": seed, "optimizer": "adam", "sampling_steps": sampling_steps,
            "start_guidance": start_guidance, "resolution": resolution, "xt_sampler": xt_sampler,
            "trained_tensors": len(out["keys"]), "final_loss": final,
            "loss_mean_first_10pct": sum(losses[:win]) / win if losses else None,
            "loss_mean_last_10pct": sum(losses[-win:]) / win if losses else None})
        path = save_unlearned(name, out["targets"], meta)
        m = patched_model(model, out["patches"], os.path.basename(path))
        plot = G.loss_plot_image(losses, f"ESD-{fp['variant']} loss: {fp['concept'][:40]}")
        n_params = sum(t.numel() for t in out["targets"].values())
        info = (f"saved {path}\nESD-{fp['variant']} '{fp['concept']}': {len(out['keys'])} tensors "
                f"({n_params / 1e6:.2f}M params), steps {steps} (resumed from {res.resumed_from}), η {eta}, "
                f"lr {learning_rate}\nloss first 10% {meta['loss_mean_first_10pct']}, last 10% "
                f"{meta['loss_mean_last_10pct']}")
        return io.NodeOutput(m, plot, info, ui=ui.PreviewText(info))


# --------------------------------------------------------------------------- Dark Miner
def resolve_anchors(text: str) -> list[str]:
    return DM.parse_anchor_prompts(text) or DM.default_anchor_prompts()


def generate_concept_latents(model, clip, concept: str, n: int, resolution: int, steps: int, cfg: float,
                             seed: int) -> torch.Tensor:
    """n images of the concept from the ORIGINAL model (ComfyUI's sampler, euler/normal), model space."""
    ch, h, w = latent_size(model, resolution)
    pos, neg = G.encode(clip, concept), G.encode(clip, "")
    lat = comfy.sample.fix_empty_latent_channels(model, torch.zeros([n, ch, h, w]))
    noise = comfy.sample.prepare_noise(lat, seed)
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, lat, seed=seed,
                              disable_pbar=True)
    lat = model.model.process_latent_in(out)
    with torch.inference_mode(False):
        return lat.detach().float().cpu().clone()


def _vec_hash(vectors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(vectors):
        h.update(k.encode())
        h.update(vectors[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _state_files(folder: str) -> list[tuple[int, str]]:
    if not os.path.isdir(folder):
        return []
    out = []
    for fn in os.listdir(folder):
        if fn.startswith("state_round_") and fn.endswith(".safetensors"):
            try:
                out.append((int(fn[len("state_round_"):-len(".safetensors")]), os.path.join(folder, fn)))
            except ValueError:
                continue
    return sorted(out)


def save_round_state(folder, records, pool, deltas, fingerprint, keep: int) -> str:
    rec = records[-1]
    tensors = {f"delta/{k}": v.detach() for k, v in deltas.items()}
    for i, m in enumerate(pool):
        for enc, v in m.vectors.items():
            tensors[f"mined/{i}/{enc}"] = v.detach().float()
    meta = {"round": str(rec.round), "fingerprint": json.dumps(fingerprint, sort_keys=True),
            "records": json.dumps([r.to_json() for r in records]),
            "mining_losses": json.dumps([m.loss for m in pool]), "format": "safegen-darkminer-state-1"}
    path = os.path.join(folder, f"state_round_{rec.round:03d}.safetensors")
    save_safetensors_atomic(tensors, path, meta)
    for _, old in _state_files(folder)[:-keep] if keep > 0 else []:
        with contextlib.suppress(OSError):
            os.remove(old)
    return path


def load_round_state(folder: str, fingerprint: dict, deltas: dict):
    """(records, pool, next round) from the newest round state, or None. Refuses other settings."""
    files = _state_files(folder)
    if not files:
        return None
    path = files[-1][1]
    wf = read_weight_file(path)
    saved = json.loads(wf.metadata.get("fingerprint", "{}"))
    want = json.loads(json.dumps(fingerprint, sort_keys=True))
    if saved != want:
        diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        raise WeightFileError(f"{os.path.basename(path)}: Dark Miner state was made with different settings "
                              f"({', '.join(diff)}); turn resume off or delete the folder {folder}")
    with torch.no_grad():
        for k, d in deltas.items():
            d.copy_(wf.tensors[f"delta/{k}"])
    losses = json.loads(wf.metadata.get("mining_losses", "[]"))
    pool = []
    for i, loss in enumerate(losses):
        vec = {k.split("/")[2]: t for k, t in wf.tensors.items() if k.startswith(f"mined/{i}/")}
        pool.append(DM.Mined(vec, float(loss)))
    records = [DM.RoundRecord.from_json(r) for r in json.loads(wf.metadata.get("records", "[]"))]
    return records, pool, int(wf.metadata["round"]) + 1


def dark_miner(model, clip, concept, anchors, *, variant="x", rounds=4, mining_steps=100, mining_lr=1e-2,
               circumvent_steps=100, learning_rate=5e-5, eta=1.0, anchor_weight=1.0, sampling_steps=50,
               start_guidance=3.0, resolution=512, concept_images=8, latents=None, verify_draws=16,
               verify_margin=0.0, seed=0, xt_sampler="erased", checkpoint_every=0, keep_checkpoints=2,
               preview_every=0, resume=False, name="dark_miner", vae=None):
    """Run Dark Miner; returns dict(records, pool, reason, targets, patches, keys, fingerprint, losses,
    last_mined, latents, anchors)."""
    concept = check_concept(concept, "Dark Miner Eraser")
    variant = ESD.check_variant(variant)
    if rounds < 1:
        raise ValueError(f"Dark Miner Eraser: rounds must be ≥ 1, got {rounds}")
    if xt_sampler not in ESD.XT_SAMPLERS:
        raise ValueError(f"unknown xt_sampler {xt_sampler!r}; one of {ESD.XT_SAMPLERS}")
    anchors = [a for a in (anchors or []) if a.strip()]
    ch, h, w = latent_size(model, resolution)
    if latents is None:
        latents = generate_concept_latents(model, clip, concept, concept_images, resolution, sampling_steps,
                                           start_guidance, seed)
    mine_lat, verify_lat = DM.split_latents(latents)
    h, w = int(latents.shape[-2]), int(latents.shape[-1])
    fingerprint = {
        "method": "dark_miner", "model": model_fingerprint(model), "concept": concept,
        "anchors": hashlib.sha256("\n".join(anchors).encode()).hexdigest()[:16], "variant": variant,
        "eta": eta, "anchor_weight": anchor_weight, "sampling_steps": sampling_steps,
        "start_guidance": start_guidance, "latents": G.weights_fingerprint({"x": latents}),
        "xt_sampler": xt_sampler, "mining_steps": mining_steps, "mining_lr": mining_lr,
        "circumvent_steps": circumvent_steps, "lr": learning_rate, "seed": seed, "verify_draws": verify_draws,
        "verify_margin": verify_margin}
    state_dir = G.checkpoint_dir("dark_miner", name)
    save_states = checkpoint_every > 0
    last = {}
    with erasure_session(model, clip, variant, w, h) as s:
        null = text_cond(clip, "")
        c_concept = text_cond(clip, concept)
        anchor_conds = [text_cond(clip, a) for a in anchors]
        # the empty prompt is always preserved too: CFG uses its prediction at every step of every image
        keep_conds = anchor_conds + ([null] if "" not in anchors else [])
        train_sigmas = G.model_sigmas(model)
        sigmas = ESD.ddim_sigmas(train_sigmas, sampling_steps)
        init = init_token_vectors(clip, concept)
        n_vec = min(16, max(v.shape[0] for v in init.values()))
        emb_text = G.prompt_with_embedding("{}")
        cond_cache: dict[int, tuple] = {}

        def cond_of(m: DM.Mined):
            if id(m) not in cond_cache:
                cond_cache[id(m)] = text_cond(clip, emb_text, m.vectors)
            return cond_cache[id(m)]

        def mine(r):
            log.info("Dark Miner round %d/%d: mining", r, rounds)
            res, _ = invert(model, clip, mine_lat, name=f"{name}_round{r}", num_vectors=n_vec, template="{}",
                            steps=mining_steps, learning_rate=mining_lr, batch_size=min(4, mine_lat.shape[0]),
                            seed=seed * 1000 + r, objective="ldm", checkpoint_every=0, resume=False,
                            init_vectors={k: v[:n_vec] for k, v in init.items()})
            win = max(1, len(res.losses) // 10)
            m = DM.Mined({k: v.detach().float().cpu() for k, v in res.params.items()},
                         sum(res.losses[-win:]) / win if res.losses else float("nan"))
            last["mined"] = m
            return m

        def verify_fn(m):
            s.hooks.check()
            return DM.verify(s.eps, verify_lat, train_sigmas, cond_of(m), null, anchor_conds,
                             draws=verify_draws, batch=4, seed=seed + 17, margin=verify_margin, erased=True)

        def preview(progress):
            return _preview_cb(s, vae, concept, seed, progress, resolution)

        def circumvent(r, pool):
            log.info("Dark Miner round %d/%d: circumventing %d embedding(s)", r, rounds, len(pool))
            s.hooks.check()
            targets = [c_concept] + [cond_of(m) for m in pool]
            loss_fn = DM.make_circumvent_loss_fn(s.eps, targets, keep_conds, null, sigmas, [1, ch, h, w],
                                                 eta=eta, anchor_weight=anchor_weight,
                                                 start_guidance=start_guidance, xt_sampler=xt_sampler)
            cfg = TrainConfig(steps=circumvent_steps, lr=learning_rate, seed=seed * 1000 + r,
                              optimizer="adam", checkpoint_every=checkpoint_every,
                              keep_checkpoints=keep_checkpoints, preview_every=preview_every)
            fp = dict(fingerprint, round=r, deltas=G.weights_fingerprint(s.deltas),
                      pool=[_vec_hash(m.vectors) for m in pool])
            progress = G.Progress(circumvent_steps, f"round {r}/{rounds} loss")
            ckpt = os.path.join(state_dir, f"round_{r:03d}") if (checkpoint_every or resume) else None
            result = train(s.deltas, loss_fn, cfg,
                           TrainCallbacks(on_step=lambda st, n, lv: progress.step(st, lv),
                                          check_interrupt=mm.throw_exception_if_processing_interrupted,
                                          on_preview=preview(progress)),
                           ckpt_dir=ckpt, resume=resume, fingerprint=fp)
            return result.losses

        records, pool, start = [], [], 1
        if save_states and not resume:  # states of an earlier run would be rotated/resumed wrongly
            for _, old in _state_files(state_dir):
                with contextlib.suppress(OSError):
                    os.remove(old)
        if resume:
            st = load_round_state(state_dir, fingerprint, s.deltas)
            if st is not None:
                records, pool, start = st
                log.info("Dark Miner: resumed after round %d", start - 1)

        def on_round_done(recs, pool_now):
            if save_states:
                save_round_state(state_dir, recs, pool_now, s.deltas, fingerprint, keep_checkpoints)
                shutil.rmtree(os.path.join(state_dir, f"round_{recs[-1].round:03d}"), ignore_errors=True)

        records, pool, reason = DM.run_rounds(rounds, mine, verify_fn, circumvent, pool=pool, records=records,
                                              start_round=start, on_round_done=on_round_done)
        targets, patches = ESD.replacement_and_patch(s.base_weights(), s.deltas)
        keys = list(s.keys)
    last_mined = last.get("mined") or (pool[-1] if pool else DM.Mined(
        {k: v[:n_vec] for k, v in init.items()}, float("nan")))
    losses = [v for rec in records for v in rec.circumvent_losses]
    return {"records": records, "pool": pool, "reason": reason, "targets": targets, "patches": patches,
            "keys": keys, "fingerprint": fingerprint, "losses": losses, "last_mined": last_mined,
            "latents": latents, "anchors": anchors}


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
                io.Combo.Input("variant", options=list(ESD.VARIANTS), default="x",
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
                io.Combo.Input("xt_sampler", options=list(ESD.XT_SAMPLERS), default="erased",
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
                Embedding.Output(display_name="EMBEDDING",
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
        name = sanitize_name(name, "dark_miner")
        latents = None
        if images is not None:
            if vae is None:
                raise ValueError("Dark Miner Eraser: connect the VAE to use concept images")
            lat = model.model.process_latent_in(vae.encode(images[:, :, :, :3]).float())
            with torch.inference_mode(False):
                latents = lat.detach().cpu().clone()
        out = dark_miner(model, clip, concept, resolve_anchors(anchor_prompts), variant=variant,
                         rounds=rounds,
                         mining_steps=mining_steps, mining_lr=mining_lr, circumvent_steps=circumvent_steps,
                         learning_rate=learning_rate, eta=eta, anchor_weight=anchor_weight,
                         sampling_steps=sampling_steps, start_guidance=start_guidance, resolution=resolution,
                         concept_images=concept_images, latents=latents, verify_draws=verify_draws,
                         verify_margin=verify_margin, seed=seed, xt_sampler=xt_sampler,
                         checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                         preview_every=preview_every, resume=resume, name=name, vae=vae)
        fp, records = out["fingerprint"], out["records"]
        meta = _meta("Dark Miner", fp, {
            "concept": fp["concept"], "variant": f"esd-{fp['variant']}", "rounds_run": len(records),
            "rounds": rounds, "stop_reason": out["reason"], "steps": circumvent_steps,
            "mining_steps": mining_steps, "eta": eta, "lr": learning_rate, "mining_lr": mining_lr,
            "anchor_weight": anchor_weight, "seed": seed, "anchors": len(out["anchors"]), "optimizer": "adam",
            "sampling_steps": sampling_steps, "start_guidance": start_guidance, "resolution": resolution,
            "xt_sampler": xt_sampler,
            "verify": "gain = L(null) - L(c) on held-out concept latents; induces if "
                      f"(gain - max(0, benign gains)) / L(null) > {verify_margin}",
            "records": [r.to_json() for r in records], "trained_tensors": len(out["keys"])})
        path = save_unlearned(name, out["targets"], meta)
        m = patched_model(model, out["patches"], os.path.basename(path))
        plot = G.loss_plot_image(out["losses"], f"Dark Miner loss: {fp['concept'][:40]}")
        emb = {"name": f"{name}_mined", "vectors": out["last_mined"].vectors,
               "metadata": {"safegen_kind": "dark_miner_mined_embedding", "concept": fp["concept"]}}
        info = (f"saved {path}\nDark Miner ESD-{fp['variant']} '{fp['concept']}': {len(out['keys'])} "
                f"tensors, {len(records)} round(s), {out['reason']}\n{DM.summary(records)}")
        return io.NodeOutput(m, emb, plot, info, ui=ui.PreviewText(info))


NODES = [ESDConceptEraser, DarkMinerEraser]
