"""Unlearned ("concept-erased") UNet weights: format detection and patch planning.

No ComfyUI import: the caller passes the base model's UNet key→shape table (LDM names,
without the ``diffusion_model.`` prefix) and the diffusers→LDM name map (ComfyUI's
``comfy.utils.unet_to_diffusers`` gives it for the base's config).

Formats recognised from the keys:

* ``ldm``       — CompVis/LDM names, with ``model.diffusion_model.`` (a whole checkpoint),
                  ``diffusion_model.`` or no prefix.
* ``diffusers`` — diffusers ``UNet2DConditionModel`` names (``down_blocks.…``), optionally
                  with a ``unet.`` prefix (ESD's partial files, UCE's edits).
* ``lora``      — adapter files (kohya ``lora_unet_*.lora_down/up`` + ``alpha``,
                  diffusers/PEFT ``*.lora_A/lora_B``, LyCORIS); handed to ComfyUI's LoRA code.

A file is *full* when it covers every UNet tensor of the base, else *partial* (ESD-x:
cross-attention ``attn2`` only; ESD-u: everything but ``attn2``; UCE / ESD-x-strict:
``attn2.to_k``/``attn2.to_v`` only).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from .weights_io import WeightFileError, list_keys

LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_PREFIXES = ("unet.", "model.")
LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.", "label_emb.")
DIFFUSERS_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "conv_out.", "conv_norm_out.",
                   "time_embedding.", "add_embedding.", "class_embedding.")
# Keys of a whole checkpoint that are not the UNet: reported, never silently dropped.
NON_UNET_PREFIXES = ("cond_stage_model.", "first_stage_model.", "conditioner.", "text_encoder",
                     "vae.", "model_ema.", "lora_te", "te_", "alphas_cumprod", "betas",
                     "log_one_minus_alphas_cumprod", "posterior_", "sqrt_", "logvar", "model_ema")
LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.",
                ".hada_w1_", ".hada_w2_", ".lokr_w1", ".lokr_w2", ".alpha", ".dora_scale",
                ".oft_blocks", ".oft_diag", "lora_linear_layer.")


@dataclass
class PatchEntry:
    file_key: str    # key in the file
    model_key: str   # LDM key in the base UNet (no "diffusion_model." prefix)
    shape: tuple     # base shape


@dataclass
class PatchPlan:
    layout: str                      # "ldm" | "diffusers"
    entries: list[PatchEntry]
    unet_keys_total: int
    ignored_non_unet: list[str] = field(default_factory=list)

    @property
    def model_keys(self) -> list[str]:
        return [e.model_key for e in self.entries]

    @property
    def is_full(self) -> bool:
        return len(self.entries) >= self.unet_keys_total

    @property
    def variant(self) -> str:
        return variant_of(self.model_keys, self.is_full)


def detect_layout(keys, name: str = "<file>") -> str:
    """'lora', 'ldm' or 'diffusers' (or raise naming the file and some keys)."""
    keys = list(keys)
    if not keys:
        raise WeightFileError(f"{name}: holds no tensors")
    if any(m in k for k in keys for m in LORA_MARKERS) or any(k.startswith("lora_unet_") for k in keys):
        return "lora"
    ldm = diff = 0
    for k in keys:
        s = _strip_any(k, LDM_PREFIXES)
        if s != k or s.startswith(LDM_ROOTS):
            ldm += 1
            continue
        s = _strip_any(k, DIFFUSERS_PREFIXES)
        if s.startswith(DIFFUSERS_ROOTS):
            diff += 1
    if ldm == 0 and diff == 0:
        raise WeightFileError(
            f"{name}: no UNet keys recognised (expected LDM 'input_blocks.*', diffusers 'down_blocks.*' "
            f"or LoRA keys); first keys: {list_keys(sorted(keys))}")
    return "ldm" if ldm >= diff else "diffusers"


def _strip_any(k: str, prefixes) -> str:
    for p in prefixes:
        if k.startswith(p):
            return k[len(p):]
    return k


def is_non_unet_key(k: str) -> bool:
    return k.startswith(NON_UNET_PREFIXES)


def plan_patches(file_shapes: dict[str, tuple], base_shapes: dict[str, tuple],
                 diffusers_to_ldm: dict[str, str] | None, name: str = "<file>") -> PatchPlan:
    """Map each tensor of an LDM- or diffusers-layout file onto a base UNet key.

    Raises :class:`WeightFileError` (naming the file, the first offending keys and shapes)
    for keys that match nothing and for shape mismatches (e.g. an SDXL file on an SD1 model).
    Tensors whose shapes differ only by singleton dimensions (linear vs 1×1 conv projections)
    are accepted and reshaped when applied.
    """
    layout = detect_layout(file_shapes.keys(), name)
    if layout == "lora":
        raise WeightFileError(f"{name}: is a LoRA-style adapter, not a UNet weight file; it is applied through "
                              f"ComfyUI's LoRA code, not planned here")
    ignored, unmatched, mismatched, entries = [], [], [], []
    for fk, shape in file_shapes.items():
        if is_non_unet_key(fk):
            ignored.append(fk)
            continue
        if layout == "ldm":
            mk = _strip_any(fk, LDM_PREFIXES)
        else:
            dk = _strip_any(fk, DIFFUSERS_PREFIXES)
            mk = (diffusers_to_ldm or {}).get(dk)
            if mk is None:
                unmatched.append(fk)
                continue
        if mk not in base_shapes:
            unmatched.append(fk)
            continue
        bshape = tuple(base_shapes[mk])
        if not same_up_to_singletons(tuple(shape), bshape):
            mismatched.append(f"{fk} {tuple(shape)} vs model {bshape}")
            continue
        entries.append(PatchEntry(fk, mk, bshape))
    if mismatched:
        hint = _family_hint(file_shapes, base_shapes)
        raise WeightFileError(
            f"{name}: {len(mismatched)} tensor(s) do not fit the model's UNet{hint}: {list_keys(mismatched, 5)}")
    if unmatched:
        hint = _family_hint(file_shapes, base_shapes)
        raise WeightFileError(
            f"{name}: {len(unmatched)} key(s) match no tensor of the model's UNet ({layout} layout){hint}: "
            f"{list_keys(unmatched)}")
    if not entries:
        raise WeightFileError(f"{name}: no UNet tensors found (only {list_keys(ignored)})")
    return PatchPlan(layout, entries, len(base_shapes), ignored)


def same_up_to_singletons(a: tuple, b: tuple) -> bool:
    return a == b or [d for d in a if d != 1] == [d for d in b if d != 1]


def context_dim(shapes: dict[str, tuple]) -> int | None:
    """Cross-attention width (768 SD1, 1024 SD2, 2048 SDXL) read from any attn2.to_k weight."""
    for k, s in shapes.items():
        if k.endswith("attn2.to_k.weight") and len(s) == 2:
            return int(s[1])
    return None


_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def _family_hint(file_shapes, base_shapes) -> str:
    f, b = context_dim(file_shapes), context_dim(base_shapes)
    if f and b and f != b:
        return (f" — the file looks like {_FAMILY.get(f, f'context {f}')} (cross-attention width {f}) "
                f"but the model is {_FAMILY.get(b, f'context {b}')} (width {b})")
    return ""


def variant_of(model_keys, is_full: bool) -> str:
    """Name the kind of partial file from which tensors it holds."""
    if is_full:
        return "full UNet"
    ks = [k for k in model_keys]
    attn2 = [k for k in ks if ".attn2." in k]
    if attn2 and len(attn2) == len(ks):
        if all(re.search(r"\.attn2\.to_[kv]\.", k) for k in ks):
            return "partial: cross-attention K/V (UCE / ESD-x-strict)"
        return "partial: cross-attention (ESD-x)"
    if not attn2:
        return "partial: all but cross-attention (ESD-u style)"
    return "partial"


def blocks_summary(model_keys, limit: int = 6) -> str:
    """'input_blocks.1 ×4, output_blocks.0 ×4' — which UNet blocks a file touches."""
    c = Counter()
    for k in model_keys:
        parts = k.split(".")
        c[".".join(parts[:2]) if parts[0] in ("input_blocks", "output_blocks") else parts[0]] += 1
    items = [f"{b} ×{n}" for b, n in c.most_common()]
    return ", ".join(items[:limit]) + (f", … ({len(items)} blocks)" if len(items) > limit else "")


def fit_to(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    return t if tuple(t.shape) == tuple(shape) else t.reshape(shape)


def blend_(base: torch.Tensor, target: torch.Tensor, strength: float) -> torch.Tensor:
    """In-place :func:`blend` into ``base`` (same results, bitwise)."""
    if strength == 1.0:
        return base.copy_(target)
    if strength == 0.0:
        return base
    return base.lerp_(target.to(base.dtype), float(strength))


def blend(base: torch.Tensor, target: torch.Tensor, strength: float) -> torch.Tensor:
    """base + strength·(target − base): strength 0 → base exactly, 1 → target exactly."""
    if strength == 1.0:
        return target.to(base.dtype).clone()
    if strength == 0.0:
        return base
    return torch.lerp(base, target.to(base.dtype), float(strength))
