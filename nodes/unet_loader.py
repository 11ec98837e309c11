"""Unlearned UNet Loader: apply concept-erased UNet weights to a MODEL as ModelPatcher patches.

The cached base model is never modified (we clone the ModelPatcher and add patches) and no
second copy of the UNet is kept: for safetensors files the patch reads each replaced tensor
from the file when ComfyUI applies patches, so only the patched weights themselves are
resident while the model is loaded.
"""
from __future__ import annotations

import logging
import os

import torch

import comfy.lora
import comfy.lora_convert
import comfy.sd
import comfy.utils
import folder_paths
from comfy.weight_adapter.base import WeightAdapterBase
from comfy_api.latest import io, ui

from ..safegen_core import unlearned as U
from ..safegen_core.weights_io import (SAFETENSORS_EXT, WeightFileError, check_finite, check_finite_file,
                                       list_keys, read_weight_file)

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


class UnlearnedWeight(WeightAdapterBase):
    """Patch: weight ← weight + strength·(unlearned − weight), via torch.lerp (exact at 0 and 1)."""

    name = "safegen_unlearned"

    def __init__(self, source: _FileTensor, shape: tuple):
        self.source, self.shape = source, tuple(shape)
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        # ``weight`` is ComfyUI's own float32 temporary copy: blend into it in place (no extra copy).
        target = U.fit_to(self.source.get(), self.shape).to(weight.device, weight.dtype)
        return U.blend_(weight, target, strength)


def _lora_key_map(model) -> dict[str, str]:
    """ComfyUI's LoRA key map plus plain diffusers/PEFT module names (``unet.…attn2.to_k``)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    for dk, lk in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items():
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
    return comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)


def apply_unlearned(model, path: str, strength: float):
    """Return (patched clone of ``model``, info dict). Raises WeightFileError on bad input."""
    name = os.path.basename(path)
    is_st = path.lower().endswith(SAFETENSORS_EXT)
    # safetensors: read shapes from the header and check values one tensor at a time, so loading a
    # file never holds it whole in memory (patches read their tensor when ComfyUI applies them).
    wf = read_weight_file(path, lazy=is_st)
    layout = U.detect_layout(wf.tensors.keys())
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
        lora = comfy.lora_convert.convert_lora(wf.tensors)
        te = [k for k in lora if U.is_non_unet_key(k)]
        unet_keys = [k for k in lora if k not in te]
        unmatched = [k for k in unet_keys if _lora_module(k, key_map) is None]
        if unmatched:
            raise WeightFileError(f"{name}: {len(unmatched)} LoRA key(s) match no UNet layer of the model: "
                                  f"{list_keys(unmatched)}")
        patches = comfy.lora.load_lora({k: lora[k] for k in unet_keys}, key_map, log_missing=False)
        bad = [f"{k} {_lora_io(v)} vs model {tuple(base_sd[k].shape[:2])}"
               for k, v in patches.items() if k in base_sd and _lora_io(v) is not None
               and _lora_io(v) != tuple(base_sd[k].shape[:2])]
        if bad:
            raise WeightFileError(f"{name}: LoRA does not fit the model's UNet: {list_keys(bad, 5)}")
        added = m.add_patches(patches, strength)
        keys = [k[len(UNET_PREFIX):] for k in added]
        info.update(kind="LoRA adapter", tensors=len(added), ignored_text_encoder=len(te))
        if te:
            log.info("%s: %d text-encoder LoRA keys ignored by the UNet loader: %s", name, len(te), list_keys(te))
    else:
        dmap = _diffusers_map(model) if layout == "diffusers" else None
        shapes = {k: tuple(v) if isinstance(v, torch.Size) else tuple(v.shape) for k, v in wf.tensors.items()}
        plan = U.plan_patches(shapes, base_shapes, dmap, name)
        skipped = 0
        patches = {}
        # the base's own weights, even while a patched clone (sharing the module) is loaded
        originals = model.get_key_patches(UNET_PREFIX) if plan.is_full else {}
        for e in plan.entries:
            src = _FileTensor(path, e.file_key, None if is_st else wf.tensors[e.file_key])
            orig = originals[UNET_PREFIX + e.model_key][0][0] if plan.is_full else None
            if orig is not None and torch.equal(U.fit_to(src.get(), e.shape).to(orig.dtype), orig):
                skipped += 1  # identical to the base: no patch needed
                continue
            patches[UNET_PREFIX + e.model_key] = UnlearnedWeight(src, e.shape)
        added = m.add_patches(patches, strength)
        keys = [k[len(UNET_PREFIX):] for k in added]
        info.update(kind=plan.variant, tensors=len(added), identical_skipped=skipped,
                    unet_tensors=plan.unet_keys_total, ignored_non_unet=len(plan.ignored_non_unet))
        if plan.ignored_non_unet:
            log.info("%s: %d non-UNet keys (text encoder / VAE) ignored: %s", name,
                     len(plan.ignored_non_unet), list_keys(plan.ignored_non_unet))
    info["blocks"] = U.blocks_summary(keys)
    del wf
    return m, info


def _lora_io(v):
    """(out, in) features of a low-rank adapter, to check against the layer (ComfyUI only logs)."""
    w = getattr(v, "weights", None)
    if getattr(v, "name", "") == "lora" and w and w[0] is not None and w[1] is not None:
        return (int(w[0].shape[0]), int(w[1].shape[1]))
    return None


def load_without_base(path: str, strength: float):
    """A full UNet file alone, like core's UNETLoader (strength must be 1)."""
    name = os.path.basename(path)
    if strength != 1.0:
        raise WeightFileError(f"{name}: strength {strength} needs a base MODEL to blend with; "
                              f"connect one or set strength to 1")
    wf = read_weight_file(path)
    check_finite(wf.tensors, name)
    layout = U.detect_layout(wf.tensors.keys())
    if layout == "lora":
        raise WeightFileError(f"{name}: is a LoRA-style adapter; connect the base MODEL it was trained on")
    m = comfy.sd.load_diffusion_model_state_dict(wf.tensors, metadata=wf.metadata)
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


class UnlearnedUNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_UnlearnedUNetLoader",
            display_name="Unlearned UNet Loader",
            category="SafeGen/unlearning",
            description=(
                "Applies a concept-erased (unlearned) UNet — ESD, UCE, RECE full or partial weights, or a "
                "DUO/MACE/SPM LoRA-style adapter — to a base MODEL as patches. The cached base is not "
                "modified. Strength 1 reproduces the unlearned model, 0 the base; values between blend "
                "the weight difference. A full UNet file also loads without a base MODEL."),
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="Unlearned weights in models/diffusion_models: full UNet (LDM or "
                                       "diffusers layout), partial file (ESD-x/-u, UCE) or LoRA adapter."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.05,
                               tooltip="1 = the unlearned model, 0 = the base; between blends the weight "
                                       "difference (beyond 1 extrapolates)."),
                io.Model.Input("model", optional=True,
                               tooltip="Base MODEL the unlearned weights were made from (from any loader). "
                                       "Optional for a full UNet file."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The unlearned model (base + patches)."),
                io.String.Output(display_name="info",
                                 tooltip="Detected format, tensors replaced and blocks touched."),
            ],
        )

    @classmethod
    def execute(cls, unet_name, strength, model=None) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        if model is None:
            m, info = load_without_base(path, strength)
        else:
            m, info = apply_unlearned(model, path, strength)
        m.model_options["safegen_unlearned"] = info["file"]
        text = format_info(info)
        log.info("SafeGen Unlearned UNet Loader: %s", text.replace("\n", "; "))
        return io.NodeOutput(m, text, ui=ui.PreviewText(text))


NODES = [UnlearnedUNetLoader]
