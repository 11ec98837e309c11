"""SafeText (text-encoder alignment) on a ComfyUI CLIP, and applying aligned-encoder files (SafeGen
deltas, DES checkpoints, AdvUnlearn / transformers weights) as CLIP weight patches.

Training design: the chosen text-encoder tensors get *delta* tensors (zeros, trainable) applied as
weight wrappers on a trainable clone of the CLIP (:mod:`.training`), so gradients reach only the
deltas. The original embeddings of every prompt are computed once, before training, with the
unmodified encoder. The saved file holds the deltas (trained − original), keyed by the CLIP's
state-dict names; applying it is a plain ``add_patches({key: ("diff", (delta,))}, strength)``.
"""
from __future__ import annotations

import logging
import os

import torch

import folder_paths

from ..safegen_core import safetext as safetext_core
from ..safegen_core.weights_io import (WeightFileError, check_finite, content_hash, list_keys, read_weight_file,
                                       sanitize_name, save_safetensors_atomic, weights_fingerprint)
from . import common, compat, text, training

log = logging.getLogger("safegen")

FOLDER = "text_encoders"
DELTA_KIND = "safe_text_encoder_delta"
LAYER_CHOICES = safetext_core.LAYER_CHOICES
FILE_EXT = (".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt")


def text_encoder_files() -> list[str]:
    return common.files_in(FOLDER, FILE_EXT)


def clip_state_dict(clip) -> dict[str, torch.Tensor]:
    return compat.clip_state_dict(clip)


def clip_fingerprint(clip) -> str:
    """Content hash of the CLIP's stored text-encoder weights."""
    return weights_fingerprint(clip_state_dict(clip))


def resolve_prompts(text: str, file_name: str, label: str, default: list[str]) -> list[str]:
    prompts = safetext_core.parse_prompt_text(text)
    if file_name and file_name.strip():
        prompts += safetext_core.read_prompt_file(common.input_path(file_name, f"{label} file"))
    prompts = safetext_core.dedupe(prompts)
    if not prompts:
        prompts = list(default)
    return prompts


def conditioning_layers(clip) -> dict[str, tuple[int, bool]]:
    """{state-dict prefix of an encoder: (index of the layer the conditioning is taken from,
    whether the final layer norm is applied)}, as ComfyUI will encode with this CLIP (its
    CLIPSetLastLayer setting included): SD1 = last layer + norm; SDXL = penultimate, no norm."""
    out = {}
    settings = compat.encoder_layer_settings(clip)
    clip_layer = settings.pop(None)
    for attr, (n, layer, idx, norm_hidden) in settings.items():
        if clip_layer is not None:  # what set_clip_options will do at encode time
            if abs(clip_layer) > n:
                layer, idx = "last", None
            else:
                layer, idx = "hidden", clip_layer
        if layer == "hidden" and idx is not None:
            out[f"{attr}.transformer.text_model."] = (idx % n, norm_hidden)
        else:  # "last" (and "pooled", whose per-token output is the last layer)
            out[f"{attr}.transformer.text_model."] = (n - 1, True)
    return out


# --------------------------------------------------------------------------- encoding
def encode_batch(clip, prompts: list[str]) -> torch.Tensor:
    """[N, 77·k, D]: the conditioning of each prompt (all prompts in one batched forward).

    The prompts' token chunks are concatenated into one token list, so ComfyUI's own
    ``encode_token_weights`` runs them as one batch; prompts must have the same chunk count."""
    toks = [clip.tokenize(p) for p in prompts]
    n_chunks = {len(next(iter(t.values()))) for t in toks}
    if len(n_chunks) != 1:
        raise ValueError("encode_batch: prompts with different chunk counts")
    merged = {k: sum((t[k] for t in toks), []) for k in toks[0]}
    cond = clip.encode_from_tokens(merged)  # [1, N·77·k, D]
    return cond.reshape(len(prompts), -1, cond.shape[-1])


def encode_each(clip, prompts: list[str]) -> list[torch.Tensor]:
    """Per-prompt conditioning [1, 77·k, D]; prompts batched by chunk count."""
    out: list[torch.Tensor | None] = [None] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(next(iter(clip.tokenize(p).values()))), []).append(i)
    for idx in groups.values():
        c = encode_batch(clip, [prompts[i] for i in idx])
        for j, i in enumerate(idx):
            out[i] = c[j:j + 1]
    return out


# --------------------------------------------------------------------------- training
def train_safetext(clip, unsafe: list[str], safe: list[str], *, lam=1.0, steps=100, lr=1e-5,
                   layers=safetext_core.LAYER_CHOICES[0], batch_size=4, seed=0, checkpoint_every=0, keep_checkpoints=2,
                   resume=False, name="safe_text_encoder", cache_originals=True):
    """Run SafeText on ``clip``; returns (TrainResult, fingerprint, keys, stats).

    ``cache_originals=False`` re-encodes the frozen originals of each step's prompts every step
    (the naive loop; same results, kept for benchmarks/bench_safetext.py)."""
    sd = clip_state_dict(clip)
    keys = safetext_core.select_keys(sd.keys(), layers, used=conditioning_layers(clip))
    if not keys:
        raise ValueError(f"no text-encoder tensors match layers={layers!r}")
    fingerprint = {"clip": clip_fingerprint(clip), "lambda": lam, "layers": layers, "batch_size": batch_size,
                   "unsafe": content_hash(unsafe), "safe": content_hash(safe)}
    with torch.inference_mode(False):
        params = {k: torch.zeros(sd[k].shape, dtype=torch.float32) for k in keys}
        with training.session(clip=clip, clip_deltas=params) as s:
            hooks, tclip = s.clip_hooks, s.clip
            with torch.no_grad(), hooks.disabled():  # originals: cached once, unmodified encoder
                orig_u = [c.detach().clone() for c in encode_each(tclip, unsafe)] if cache_originals else None
                orig_s = [c.detach().clone() for c in encode_each(tclip, safe)] if cache_originals else None

            def pick(n_total, g):
                k = min(batch_size, n_total)
                return torch.randperm(n_total, generator=g)[:k].tolist()

            def enc(prompts_idx, prompts, origs):
                news = encode_each(tclip, [prompts[i] for i in prompts_idx])
                new = torch.cat([x.reshape(-1, x.shape[-1]) for x in news])[None]
                if not cache_originals:  # naive: the frozen encoder runs again every step
                    with torch.no_grad(), hooks.disabled():
                        origs = dict(zip(prompts_idx, encode_each(tclip, [prompts[i] for i in prompts_idx])))
                # per-chunk layout is preserved, so BOS positions stay at multiples of 77
                ref = torch.cat([origs[i].reshape(-1, origs[i].shape[-1]) for i in prompts_idx])[None]
                return new, ref

            def loss_fn(step, g):
                iu, is_ = pick(len(unsafe), g), pick(len(safe), g)
                u_new, u_ref = enc(iu, unsafe, orig_u)
                s_new, s_ref = enc(is_, safe, orig_s)
                loss, lu, le = safetext_core.safetext_loss(s_new, s_ref, u_new, u_ref, lam)
                loss_fn.last = (float(lu.detach()), float(le.detach()))
                return loss

            loss_fn.last = (float("nan"), float("nan"))
            result = training.run(params, loss_fn, steps=steps, lr=lr, seed=seed, optimizer="adamw",
                                  checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                                  kind="safe_text_encoder", name=name, resume=resume, fingerprint=fingerprint)
    stats = {"final_L_u": loss_fn.last[0], "final_L_e": loss_fn.last[1]}
    return result, fingerprint, keys, stats


# --------------------------------------------------------------------------- applying files
def deltas_from_file(clip, path: str) -> tuple[dict[str, torch.Tensor], str]:
    """{clip key: delta} from a SafeGen delta file, or from full text-encoder weights (DES
    ``model_state_dict``, AdvUnlearn/transformers ``text_model.*``, LDM, ComfyUI) converted to
    differences against ``clip``'s stored weights. Returns (deltas, kind)."""
    fname = os.path.basename(path)
    try:
        wf = read_weight_file(path)
    except WeightFileError as e:
        raise ValueError(str(e)) from e
    # buffers a text-encoder file legitimately carries (int64 position_ids, …) are not weights
    check_finite({k: t for k, t in wf.tensors.items() if not safetext_core.is_known_extra_key(k)}, fname)
    sd = clip_state_dict(clip)
    if wf.metadata.get("safegen_kind") == DELTA_KIND:
        if not any(bool(t.abs().max() > 0) for t in wf.tensors.values() if t.numel()):
            raise ValueError(f"{fname}: every delta is zero: the file would change nothing")
        missing = [k for k in wf.tensors if k not in sd]
        if missing:
            raise ValueError(f"{fname}: {len(missing)} key(s) are not in this CLIP (made for another text "
                             f"encoder?): {list_keys(missing)}")
        bad = [k for k, t in wf.tensors.items() if tuple(t.shape) != tuple(sd[k].shape)]
        if bad:
            raise ValueError(f"{fname}: shape mismatch for {list_keys(bad)} "
                             f"(file {tuple(wf.tensors[bad[0]].shape)} vs CLIP {tuple(sd[bad[0]].shape)})")
        return {k: t.float() for k, t in wf.tensors.items()}, "safegen delta"
    # full weights: find which encoder of the CLIP they belong to (by the final layer norm width)
    prefixes = sorted({k[: k.index("transformer.text_model.")] + "transformer." for k in sd
                       if "transformer.text_model." in k})
    not_text_model = [k for k in wf.tensors if safetext_core.to_hf_text_model_key(k) is None]
    carried = [k for k in not_text_model if safetext_core.is_known_extra_key(k)]
    foreign = [k for k in not_text_model if k not in carried]
    if foreign:
        raise ValueError(f"{fname}: {len(foreign)} key(s) are not text-encoder weights and would be ignored "
                         f"(expected text_model.* / encoder.* / clip_l|clip_g.transformer.* names): "
                         f"{list_keys(foreign)}")
    if carried:
        log.info("SafeGen Safe Text Encoder: %s: %d key(s) a text-encoder file carries but a CLIP's conditioning "
                 "does not use, ignored: %s", fname, len(carried), list_keys(carried))
    mapped_by_prefix = {}
    for pre in prefixes:
        mapped, unknown = {}, []
        for k, t in wf.tensors.items():
            hk = safetext_core.to_hf_text_model_key(k)
            if hk is None:
                continue
            ck = pre + hk
            if ck in sd and tuple(sd[ck].shape) == tuple(t.shape):
                mapped[ck] = t
            else:
                unknown.append(k)
        mapped_by_prefix[pre] = (mapped, unknown)
    best = max(mapped_by_prefix, key=lambda p: len(mapped_by_prefix[p][0])) if mapped_by_prefix else None
    if best is None or not mapped_by_prefix[best][0]:
        raise ValueError(f"{fname}: no tensor matches this CLIP's text-encoder keys/shapes "
                         f"(file keys: {list_keys(wf.tensors.keys())})")
    mapped, unknown = mapped_by_prefix[best]
    if unknown:
        raise ValueError(f"{fname}: {len(unknown)} text-encoder tensor(s) do not match this CLIP "
                         f"({best[:-1]}): {list_keys(unknown)}")
    deltas = {}
    for ck, t in mapped.items():
        d = t.float() - sd[ck].float()
        if bool(d.abs().max() > 0):
            deltas[ck] = d
    if not deltas:
        raise ValueError(f"{fname}: every tensor equals this CLIP's own ({len(mapped)} compared): the file "
                         f"would change nothing")
    kind = f"full weights ({wf.fmt}, {best}text_model.*) as differences"
    return deltas, kind


def apply_deltas(clip, deltas: dict[str, torch.Tensor], strength: float):
    c = clip.clone()
    if strength != 0 and deltas:
        added = c.add_patches({k: ("diff", (v,)) for k, v in deltas.items()}, strength)
        if len(added) != len(deltas):
            miss = sorted(set(deltas) - set(added))
            raise ValueError(f"{len(miss)} delta key(s) not in this CLIP: {list_keys(miss)}")
    return c




def run_safetext_training(clip, *, unsafe_prompts, safe_prompts, unsafe_file="", safe_file="", name, lambda_,
                          steps, learning_rate, layers, batch_size, seed, checkpoint_every, resume):
    """The Safe Text Encoder Trainer: (patched CLIP, loss plot, info); saves the delta file."""
    name = sanitize_name(name, "safe_text_encoder")
    unsafe = resolve_prompts(unsafe_prompts, unsafe_file, "unsafe", safetext_core.default_unsafe_prompts())
    safe = resolve_prompts(safe_prompts, safe_file, "safe", safetext_core.default_safe_prompts())
    result, fp, keys, stats = train_safetext(
        clip, unsafe, safe, lam=lambda_, steps=steps, lr=learning_rate, layers=layers, batch_size=batch_size,
        seed=seed, checkpoint_every=checkpoint_every, resume=resume, name=name)
    deltas = safetext_core.delta_state_dict(result.params)
    final = result.losses[-1] if result.losses else float("nan")
    meta = {"safegen_kind": DELTA_KIND, "base_clip_hash": fp["clip"], "lambda": lambda_, "steps": steps,
            "lr": learning_rate, "layers": layers, "batch_size": batch_size, "seed": seed,
            "unsafe_prompts": len(unsafe), "safe_prompts": len(safe), "final_loss": final,
            "final_L_u": stats["final_L_u"], "final_L_e": stats["final_L_e"], "trained_tensors": len(keys),
            "loss": "L_u (squared distance of safe prompts to their originals, relative to the originals' "
                    "energy) - lambda * mean(1 - cos) (unsafe, non-BOS tokens)"}
    path = os.path.join(folder_paths.get_folder_paths(FOLDER)[0], f"{name}.safetensors")
    save_safetensors_atomic(deltas, path, meta)
    out_clip = apply_deltas(clip, deltas, 1.0)
    plot = common.loss_plot_image(result.losses, f"SafeText loss: {name}")
    info = (f"saved {path}\nsteps {steps} (resumed from {result.resumed_from}), final loss {final:.5f} "
            f"(L_u {stats['final_L_u']:.5f}, L_e {stats['final_L_e']:.4f}), λ {lambda_}, layers {layers}, "
            f"{len(keys)} tensors, prompts unsafe {len(unsafe)} / safe {len(safe)}")
    return out_clip, plot, info


def apply_file(clip, file: str, strength: float, prompt: str):
    """The Safe Text Encoder node: (patched CLIP, CONDITIONING of ``prompt``)."""
    path = common.full_path(FOLDER, file, "text encoder file")
    deltas, kind = deltas_from_file(clip, path)
    log.info("SafeGen: %s from %s: %d patched tensors, strength %g", kind, file, len(deltas), strength)
    c = apply_deltas(clip, deltas, strength)
    return c, text.encode(c, prompt)
