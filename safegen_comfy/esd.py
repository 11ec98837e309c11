"""ESD (Erasing Concepts from Diffusion Models) on a ComfyUI MODEL; the objective is
``safegen_core.esd``'s.

How training touches the model (ESD and Dark Miner): the selected UNet tensors (variant x / u /
x-strict) get *delta* tensors (zeros, float32, the only trainable tensors), applied as weight
wrappers on a trainable clone (:mod:`.training`); the frozen original θ0 is the same clone with
the wrappers switched off. Output MODEL = the input MODEL cloned with the learned differences as
``diff`` patches. The saved file (``models/diffusion_models/<name>.safetensors``) holds the
*replacement* tensors θ0 + Δ of the trained keys in LDM names (``model.diffusion_model.*``): a
partial file the Unlearned UNet Loader reads, which at strength 1 on the same base MODEL
reproduces the eraser's MODEL.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from ..safegen_core import esd as esd_core
from ..safegen_core.weights_io import sanitize_name, save_safetensors_atomic
from . import common, compat, text, training
from .inversion import model_fingerprint

log = logging.getLogger("safegen")

FOLDER = "diffusion_models"
UNET = training.UNET_PREFIX
FILE_PREFIX = "model.diffusion_model."
KIND = "unlearned_unet_partial"
VARIANTS = esd_core.VARIANTS
XT_SAMPLERS = esd_core.XT_SAMPLERS


@dataclass
class Erasure:
    """A training session of selected UNet tensors (see module docstring)."""
    session: training.Session
    keys: list
    deltas: dict
    width: int    # latent width
    height: int   # latent height

    @property
    def model(self):
        return self.session.model

    @property
    def clip(self):
        return self.session.clip

    @property
    def hooks(self) -> training.DeltaHooks:
        return self.session.unet_hooks

    def eps(self, x, sigma, cond, erased):
        """ε of the erased (θ0 + Δ) or original (θ0) model at x = x0 + σ·ε."""
        ctx = contextlib.nullcontext() if erased else self.hooks.disabled()
        with ctx:
            dev = compat.load_device(self.model)
            c, p = cond
            out = compat.predict_eps(self.model, x.to(dev), sigma.to(dev), c.to(dev),
                                     None if p is None else p.to(dev), self.width, self.height)
            return out.to(x.device)

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The selected tensors as they are in the loaded model (θ0, input MODEL's patches applied)."""
        return training.unet_tensors(self.model, self.keys)


@contextlib.contextmanager
def erasure_session(model, clip, variant: str, width: int, height: int, reference: str | None = None):
    """Trainable clones of MODEL/CLIP with zero deltas on the variant's tensors (selected as the
    ``reference`` ESD script does; see ``safegen_core.esd.select_parameters``)."""
    with torch.inference_mode(False):
        unet = compat.unet(model)
        keys = esd_core.select_parameters(unet, variant, reference)
        params = dict(unet.named_parameters())
        deltas = {k: torch.zeros(params[k].shape, dtype=torch.float32, device=params[k].device) for k in keys}
        with training.session(model, clip, unet_deltas=deltas) as s:
            yield Erasure(s, keys, deltas, width, height)


def text_cond(clip, prompt: str, vectors: dict | None = None):
    """(cond, pooled) as normal (non-inference) tensors, no autograd; ``embedding:safegen_vectors`` in
    ``prompt`` is ``vectors``."""
    with torch.inference_mode(False), torch.no_grad():
        if vectors is None:
            tokens = clip.tokenize(prompt)
        else:
            tokens = text.tokens_with_vectors(clip, prompt, {k: v.detach() for k, v in vectors.items()})
        cond, pooled = text.encode_tokens(clip, tokens)
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


def save_unlearned(name: str, targets: dict[str, torch.Tensor], meta: dict) -> str:
    path = os.path.join(common.first_folder(FOLDER), f"{name}.safetensors")
    save_safetensors_atomic({FILE_PREFIX + k: v for k, v in targets.items()}, path, meta)
    return path


def latent_size(model, resolution: int) -> tuple[int, int, int]:
    """(channels, h, w) of the latent for a square image of ``resolution`` pixels."""
    s = max(1, int(resolution) // 8)
    return compat.latent_channels(model), s, s


def check_settings(concept: str, node: str, variant: str, xt_sampler: str) -> tuple[str, str, str]:
    """(concept, variant, xt_sampler) checked; raises with the node's name on a bad value."""
    c = (concept or "").strip()
    if not c:
        raise ValueError(f"{node}: concept is empty ({concept!r}); write the concept to erase, e.g. 'nudity'")
    try:
        return c, esd_core.check_variant(variant), esd_core.check_xt_sampler(xt_sampler)
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from e


def preview_fn(er: Erasure, vae, prompt: str, seed: int, resolution: int):
    """A preview sampler of ``prompt`` with the current erased weights (None without a VAE)."""
    if vae is None:
        return None

    def on_preview(step):
        with torch.no_grad():
            pos, neg = text.encode(er.clip, prompt), text.encode(er.clip, "")
            img = common.sample_preview(er.model, vae, pos, neg, seed, steps=8, width=resolution, height=resolution)
        return common.image_to_pil(img)
    return on_preview


def file_meta(method: str, fp: dict, extra: dict) -> dict:
    meta = {"safegen_kind": KIND, "method": method, "base_model_hash": fp["model"],
            "layout": "LDM names, replacement tensors (base + learned difference) of the trained keys only"}
    meta.update(extra)
    return meta


class NothingToErase(ValueError):
    pass


def reference_settings(xt_sampler: str, steps: int | None, learning_rate: float | None) -> tuple[int, float]:
    """Steps and learning rate; 0/None = the default of the reference the x_t sampler follows
    (``safegen_core.esd.REFERENCE_DEFAULTS``: erased → CompVis train-esd.py 1000 × 1e-5, original →
    esd_sd.py 200 × 5e-5)."""
    ref = esd_core.REFERENCE_DEFAULTS[esd_core.check_xt_sampler(xt_sampler)]
    return (int(steps) if steps else int(ref["steps"]), float(learning_rate) if learning_rate else float(ref["lr"]))


def check_something_to_erase(er: Erasure, concept: str, c_concept, c_null, sigmas, shape, seed: int) -> float:
    """Refuse a concept whose prediction equals the empty prompt's on this model: ESD's target would be
    ε0(∅) and training would change nothing the concept controls."""
    with torch.no_grad():
        diff = esd_core.concept_difference(er.eps, c_concept, c_null, sigmas, shape, seed=seed)
    if esd_core.nothing_to_erase(diff):
        raise NothingToErase(
            f"ESD: nothing to erase — on this model the prediction for '{concept}' equals the empty prompt's "
            f"(relative difference {diff:.2e} ≤ {esd_core.NOTHING_TO_ERASE_TOL:g}); the model does not know the "
            f"concept by that text (already erased, or a word it never saw alone). Check the concept or the model.")
    return diff


def esd_erase(model, clip, concept, *, variant="x", eta=1.0, steps=None, learning_rate=None, seed=0,
              sampling_steps=50, start_guidance=3.0, resolution=512, xt_sampler="erased", checkpoint_every=0,
              keep_checkpoints=2, preview_every=0, resume=False, name="esd_concept", vae=None):
    """Run ESD as the reference of ``xt_sampler`` does (x_t, timestep draw, trained tensors, defaults);
    returns dict(result, keys, targets, patches, fingerprint, concept_difference, loss_rose)."""
    concept, variant, xt_sampler = check_settings(concept, "ESD Concept Eraser", variant, xt_sampler)
    steps, learning_rate = reference_settings(xt_sampler, steps, learning_rate)
    ch, h, w = latent_size(model, resolution)
    fingerprint = {"method": "esd", "model": None, "concept": concept, "variant": variant,
                   "eta": eta, "sampling_steps": sampling_steps, "start_guidance": start_guidance,
                   "latent": [ch, h, w], "xt_sampler": xt_sampler, "reference": "v2"}
    with erasure_session(model, clip, variant, w, h, reference=xt_sampler) as er:
        fingerprint["model"] = model_fingerprint(er.model)
        c_concept, c_null = text_cond(er.clip, concept), text_cond(er.clip, "")
        train_sigmas = common.model_sigmas(model)
        sigmas = esd_core.ddim_sigmas(train_sigmas, sampling_steps)
        diff = check_something_to_erase(er, concept, c_concept, c_null, sigmas, [1, ch, h, w], seed)
        loss_fn = esd_core.make_esd_loss_fn(er.eps, c_concept, c_null, sigmas, [1, ch, h, w], eta=eta,
                                            start_guidance=start_guidance, xt_sampler=xt_sampler,
                                            train_sigmas=train_sigmas)
        result = training.run(er.deltas, loss_fn, steps=steps, lr=learning_rate, seed=seed, optimizer="adam",
                              label="ESD loss", checkpoint_every=checkpoint_every,
                              keep_checkpoints=keep_checkpoints, preview_every=preview_every,
                              on_preview=preview_fn(er, vae, concept, seed, resolution), kind="esd", name=name,
                              resume=resume, fingerprint=fingerprint)
        er.hooks.check()
        targets, patches = esd_core.replacement_and_patch(er.base_weights(), result.params)
        keys = list(er.keys)
    rose = esd_core.loss_rose(result.losses)
    if rose:
        log.warning("SafeGen ESD '%s': %s", concept, rose)
    return {"result": result, "keys": keys, "targets": targets, "patches": patches, "fingerprint": fingerprint,
            "concept_difference": diff, "loss_rose": rose, "steps": steps, "learning_rate": learning_rate}


def run_esd(model, clip, concept, *, name, **settings):
    """The ESD Concept Eraser: (erased MODEL, loss plot, info); saves the partial file."""
    name = sanitize_name(name, "esd_concept")
    out = esd_erase(model, clip, concept, name=name, **settings)
    res, fp = out["result"], out["fingerprint"]
    losses = res.losses
    final = losses[-1] if losses else float("nan")
    win = max(1, len(losses) // 10)
    keep = ("eta", "seed", "sampling_steps", "start_guidance", "resolution", "xt_sampler")
    ref = esd_core.REFERENCE_DEFAULTS[fp["xt_sampler"]]
    meta = file_meta("ESD", fp, {
        "concept": fp["concept"], "variant": f"esd-{fp['variant']}", "lr": out["learning_rate"],
        "steps": out["steps"], "optimizer": "adam", **{k: settings[k] for k in keep if k in settings},
        "reference": ref["source"], "concept_difference": out["concept_difference"],
        "trained_tensors": len(out["keys"]), "final_loss": final,
        "loss_mean_first_10pct": sum(losses[:win]) / win if losses else None,
        "loss_mean_last_10pct": sum(losses[-win:]) / win if losses else None,
        "warning": out["loss_rose"] or ""})
    path = save_unlearned(name, out["targets"], meta)
    m = patched_model(model, out["patches"], os.path.basename(path))
    plot = common.loss_plot_image(losses, f"ESD-{fp['variant']} loss: {fp['concept'][:40]}")
    n_params = sum(t.numel() for t in out["targets"].values())
    info = (f"saved {path}\nESD-{fp['variant']} '{fp['concept']}': {len(out['keys'])} tensors "
            f"({n_params / 1e6:.2f}M params), steps {out['steps']} (resumed from {res.resumed_from}), "
            f"η {settings.get('eta')}, lr {out['learning_rate']:g}, x_t as {ref['source'].split(' @')[0]}\n"
            f"concept vs empty prompt before: {out['concept_difference']:.3g} (relative)\nloss first 10% "
            f"{meta['loss_mean_first_10pct']}, last 10% {meta['loss_mean_last_10pct']}")
    if out["loss_rose"]:
        info += f"\nWARNING: {out['loss_rose']}"
    return m, plot, info
