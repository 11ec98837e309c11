"""Unlearned UNet weights on a MODEL as ModelPatcher patches (the Unlearned UNet Loader's runtime).

The cached base model is never modified (we clone the ModelPatcher and add patches) and no
second copy of the UNet is kept: for safetensors files the patch reads each replaced tensor
from the file when ComfyUI applies patches, so only the patched weights themselves are
resident while the model is loaded.
"""
from __future__ import annotations

import logging
import os

import torch

import folder_paths

from ..safegen_core import unlearned as unlearned_core
from ..safegen_core.weights_io import (SAFETENSORS_EXT, WeightFileError, check_finite, check_finite_file,
                                       list_keys, read_weight_file)
from . import compat

log = logging.getLogger("safegen")
UNET_PREFIX = "diffusion_model."
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".lora_A.weight",
                 ".lora_B.weight", ".alpha", ".dora_scale", "_lora.up.weight", "_lora.down.weight",
                 ".lora.up.weight", ".lora.down.weight", ".lora_linear_layer.up.weight",
                 ".lora_linear_layer.down.weight", ".diff", ".diff_b", ".set_weight")


class _FileTensor:
    """One tensor of a weight file, read on demand (safetensors) or held (pickle files)."""

    def __init__(self, path: str, key: str, tensor: torch.Tensor | None = None):
        self.path, self.key, self.tensor = path, key, tensor
        st = os.stat(path)
        self.stamp = (st.st_size, st.st_mtime_ns)

    def get(self) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor
        st = os.stat(self.path)
        if (st.st_size, st.st_mtime_ns) != self.stamp:
            raise WeightFileError(
                f"{os.path.basename(self.path)} changed on disk after it was loaded; run the loader again")
        from safetensors import safe_open
        with safe_open(self.path, framework="pt", device="cpu") as f:
            return f.get_tensor(self.key)


class UnlearnedWeight(compat.weight_adapter_base()):
    """Patch: weight ← weight + strength·(unlearned − weight), via torch.lerp (exact at 0 and 1)."""

    name = "safegen_unlearned"

    def __init__(self, source: _FileTensor, shape: tuple):
        self.source, self.shape = source, tuple(shape)
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        # ``weight`` is ComfyUI's own float32 temporary copy: blend into it in place (no extra copy).
        target = unlearned_core.fit_to(self.source.get(), self.shape).to(weight.device, weight.dtype)
        return unlearned_core.blend_(weight, target, strength)


def _lora_key_map(model) -> dict[str, str]:
    """ComfyUI's LoRA key map plus plain diffusers/PEFT module names (``unet.…attn2.to_k``)."""
    key_map = compat.lora_key_map(model)
    for dk, lk in _diffusers_map(model).items():
        if not dk.endswith(".weight"):
            continue
        base = dk[: -len(".weight")]
        for p in ("", "unet.", "base_model.model.", "base_model.model.unet."):
            key_map.setdefault(p + base, UNET_PREFIX + lk)
    return key_map


def _lora_module(k: str, key_map) -> str | None:
    for suf in LORA_SUFFIXES:
        if k.endswith(suf):
            mod = k[: -len(suf)]
            return mod if mod in key_map else None
    parts = k.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in key_map:
            return ".".join(parts[:i])
    return None


def _diffusers_map(model) -> dict[str, str]:
    return compat.diffusers_to_ldm_names(model)


def apply_unlearned(model, path: str, strength: float):
    """Return (patched clone of ``model``, info dict). Raises WeightFileError on bad input."""
    name = os.path.basename(path)
    is_st = path.lower().endswith(SAFETENSORS_EXT)
    # safetensors: read shapes from the header and check values one tensor at a time, so loading a
    # file never holds it whole in memory (patches read their tensor when ComfyUI applies them).
    wf = read_weight_file(path, lazy=is_st)
    layout = unlearned_core.detect_layout(wf.tensors.keys(), name)
    if layout == "lora" and is_st:
        wf = read_weight_file(path)  # adapters are small and ComfyUI's LoRA code needs the tensors
    if is_st and layout != "lora":
        check_finite_file(path)
    else:
        check_finite(wf.tensors, name)
    base_sd = model.model_state_dict(UNET_PREFIX)
    base_shapes = {k[len(UNET_PREFIX):]: tuple(v.shape) for k, v in base_sd.items()}
    m = model.clone()
    info = {"file": name, "strength": strength, "format": layout}

    if layout == "lora":
        key_map = _lora_key_map(model)
        lora = compat.convert_lora(wf.tensors)
        te = [k for k in lora if unlearned_core.is_non_unet_key(k)]
        unet_keys = [k for k in lora if k not in te]
        unmatched = [k for k in unet_keys if _lora_module(k, key_map) is None]
        if unmatched:
            raise WeightFileError(f"{name}: {len(unmatched)} LoRA key(s) match no UNet layer of the model: "
                                  f"{list_keys(unmatched)}")
        alphas = [f"{k} {tuple(lora[k].shape)}" for k in unet_keys if k.endswith(".alpha") and lora[k].numel() != 1]
        if alphas:
            raise WeightFileError(f"{name}: LoRA alpha must be one number per layer: {list_keys(alphas, 5)}")
        patches = compat.lora_patches({k: lora[k] for k in unet_keys}, key_map)
        bad = [f"{k} {compat.lora_in_out(v)} vs model {tuple(base_sd[k].shape[:2])}"
               for k, v in patches.items() if k in base_sd and compat.lora_in_out(v) is not None
               and compat.lora_in_out(v) != tuple(base_sd[k].shape[:2])]
        if bad:
            raise WeightFileError(f"{name}: LoRA does not fit the model's UNet: {list_keys(bad, 5)}")
        check_lora_patches(name, patches, lora, unet_keys, key_map, base_sd)
        added = m.add_patches(patches, strength)
        keys = [k[len(UNET_PREFIX):] for k in added]
        info.update(kind="LoRA adapter", tensors=len(added), ignored_text_encoder=len(te))
        if te:
            log.info("%s: %d text-encoder LoRA keys ignored by the UNet loader: %s", name, len(te), list_keys(te))
    else:
        dmap = _diffusers_map(model) if layout == "diffusers" else None
        shapes = {k: tuple(v) if isinstance(v, torch.Size) else tuple(v.shape) for k, v in wf.tensors.items()}
        plan = unlearned_core.plan_patches(shapes, base_shapes, dmap, name)
        skipped = 0
        patches = {}
        # the base's own weights, even while a patched clone (sharing the module) is loaded
        originals = compat.base_weights(model, UNET_PREFIX)
        for e in plan.entries:
            src = _FileTensor(path, e.file_key, None if is_st else wf.tensors[e.file_key])
            orig = originals[UNET_PREFIX + e.model_key]
            if torch.equal(unlearned_core.fit_to(src.get(), e.shape).to(orig.dtype), orig):
                skipped += 1  # identical to the base: no patch needed
                continue
            patches[UNET_PREFIX + e.model_key] = UnlearnedWeight(src, e.shape)
        if not patches:
            raise WeightFileError(f"{name}: every tensor equals the model's own ({skipped} of {len(plan.entries)}): "
                                  f"the file would change nothing")
        added = m.add_patches(patches, strength)
        keys = [k[len(UNET_PREFIX):] for k in added]
        info.update(kind=plan.variant, tensors=len(added), identical_skipped=skipped,
                    unet_tensors=plan.unet_keys_total, ignored_non_unet=len(plan.ignored_non_unet))
        if plan.ignored_non_unet:
            log.info("%s: %d non-UNet keys (text encoder / VAE) ignored: %s", name,
                     len(plan.ignored_non_unet), list_keys(plan.ignored_non_unet))
    info["blocks"] = unlearned_core.blocks_summary(keys)
    del wf
    return m, info


def check_lora_patches(name: str, patches: dict, lora: dict, unet_keys: list, key_map: dict, base_sd: dict) -> None:
    """Refuse what ComfyUI would ignore or fail on later, silently, while sampling: file keys that no
    patch consumes (only `down`, only `alpha`, rank-0 pairs, stray keys), and patches that do not
    compute — each adapter is applied once to a float32 copy of its base weight here (ComfyUI's own
    ``calculate_weight``); a wrong rank, shape or a result equal to the base (an all-zero adapter)
    is an error naming the layer."""
    consumed = set()
    for k in unet_keys:
        mod = _lora_module(k, key_map)
        p = patches.get(key_map.get(mod)) if mod is not None else None
        if p is None:
            continue
        if k in getattr(p, "loaded_keys", set()) or k.endswith((".alpha", ".dora_scale", ".diff", ".diff_b",
                                                                ".set_weight", ".w_norm", ".b_norm")):
            consumed.add(k)
    unused = [k for k in unet_keys if k not in consumed]
    if unused:
        raise WeightFileError(f"{name}: {len(unused)} LoRA key(s) form no complete adapter (ComfyUI would ignore "
                              f"them, e.g. a 'down' without its 'up' or a rank-0 pair): {list_keys(unused)}")
    if not patches:
        raise WeightFileError(f"{name}: no LoRA adapter in the file applies to the model's UNet")
    failed = []
    for mk, p in patches.items():
        base = base_sd.get(mk)
        if base is None:
            failed.append(f"{mk}: not in the model")
            continue
        w = base.detach().to(torch.float32).clone()
        try:
            out = compat.apply_patch_once(p, w, mk)
        except Exception as e:  # noqa: BLE001 - reported with the layer's name
            failed.append(f"{mk}: {type(e).__name__}: {str(e)[:120]}")
            continue
        if tuple(out.shape) != tuple(base.shape):
            failed.append(f"{mk}: gives shape {tuple(out.shape)}, the layer has {tuple(base.shape)}")
        elif not bool(torch.isfinite(out).all()):
            failed.append(f"{mk}: gives NaN/inf")
        elif torch.equal(out, base.detach().to(torch.float32)):
            failed.append(f"{mk}: changes nothing (zero adapter, or shapes ComfyUI cannot apply: "
                          f"{compat.adapter_shapes(p)})")
    if failed:
        raise WeightFileError(f"{name}: {len(failed)} LoRA layer(s) would not apply: {list_keys(failed, 4)}")


def load_without_base(path: str, strength: float):
    """A full UNet file alone, like core's UNETLoader (strength must be 1)."""
    name = os.path.basename(path)
    if strength != 1.0:
        raise WeightFileError(f"{name}: strength {strength} needs a base MODEL to blend with; "
                              f"connect one or set strength to 1")
    wf = read_weight_file(path)
    check_finite(wf.tensors, name)
    layout = unlearned_core.detect_layout(wf.tensors.keys(), name)
    if layout == "lora":
        raise WeightFileError(f"{name}: is a LoRA-style adapter; connect the base MODEL it was trained on")
    m = compat.load_unet_state_dict(wf.tensors, wf.metadata)
    if m is None:
        raise WeightFileError(
            f"{name}: ComfyUI could not detect a UNet type from this file ({layout} layout, "
            f"{len(wf.tensors)} tensors; a partial file needs a base MODEL). First keys: "
            f"{list_keys(sorted(wf.tensors))}")
    n = len(m.model_state_dict(UNET_PREFIX))
    return m, {"file": name, "strength": 1.0, "format": layout, "kind": "full UNet (no base)",
               "tensors": n, "blocks": "all"}


def format_info(info: dict) -> str:
    parts = [f"{info['file']}: {info['kind']} ({info['format']} layout)",
             f"tensors replaced: {info['tensors']}" + (f" of {info['unet_tensors']}" if 'unet_tensors' in info else ""),
             f"strength: {info['strength']:g}", f"blocks: {info['blocks']}"]
    if info.get("identical_skipped"):
        parts.append(f"identical to base (not patched): {info['identical_skipped']}")
    if info.get("ignored_non_unet"):
        parts.append(f"non-UNet keys ignored: {info['ignored_non_unet']}")
    if info.get("ignored_text_encoder"):
        parts.append(f"text-encoder LoRA keys ignored: {info['ignored_text_encoder']}")
    return "\n".join(parts)


def load(unet_name: str, strength: float, model=None):
    """The Unlearned UNet Loader: (MODEL, info text)."""
    path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
    if model is None:
        m, info = load_without_base(path, strength)
    else:
        m, info = apply_unlearned(model, path, strength)
    m.model_options["safegen_unlearned"] = info["file"]
    text = format_info(info)
    log.info("SafeGen Unlearned UNet Loader: %s", text.replace("\n", "; "))
    return m, text


def diffusion_model_files() -> list[str]:
    return folder_paths.get_filename_list("diffusion_models")
