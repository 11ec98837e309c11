"""Writers for the unlearned-weight file formats the Unlearned UNet Loader reads.

Used by tests and benchmarks to make files the way the reference tools release them:
full UNets (LDM/CompVis or diffusers names), partial files (ESD-x, ESD-u, UCE / ESD-x-strict)
and LoRA-style adapters (kohya and diffusers/PEFT names). Inputs are UNet state dicts in LDM
names without any prefix. Needs ComfyUI importable (for ``comfy.utils.unet_to_diffusers``).
"""
from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

VARIANTS = {
    "esd-x": lambda k: ".attn2." in k,
    "esd-u": lambda k: ".attn2." not in k,
    "uce": lambda k: re.search(r"\.attn2\.to_[kv]\.weight$", k) is not None,
    "all": lambda k: True,
}


def ldm_to_diffusers_names(unet_config) -> dict[str, str]:
    """LDM name → diffusers name, by inverting ComfyUI's diffusers → LDM table."""
    import comfy.utils
    return {ldm: d for d, ldm in comfy.utils.unet_to_diffusers(unet_config).items()}


def perturb(unet_sd: dict[str, torch.Tensor], variant: str = "all", scale: float = 0.05,
            seed: int = 0) -> dict[str, torch.Tensor]:
    """A fake 'unlearned' UNet: the tensors selected by ``variant`` moved by relative noise."""
    g = torch.Generator().manual_seed(seed)
    sel = VARIANTS[variant]
    out = {}
    for k, v in unet_sd.items():
        if sel(k) and v.is_floating_point():
            n = torch.randn(v.shape, generator=g, dtype=torch.float32)
            out[k] = (v.float() + scale * (v.float().std() + 1e-3) * n).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def select(unet_sd, variant: str):
    return {k: v for k, v in unet_sd.items() if VARIANTS[variant](k)}


def write_ldm(path, unet_sd, prefix: str = "model.diffusion_model.", metadata=None):
    save_file({prefix + k: v.contiguous() for k, v in unet_sd.items()}, str(path), metadata=metadata)
    return path


def write_diffusers(path, unet_sd, unet_config, prefix: str = "", metadata=None):
    names = ldm_to_diffusers_names(unet_config)
    missing = [k for k in unet_sd if k not in names]
    if missing:
        raise KeyError(f"no diffusers name for {missing[:5]}")
    save_file({prefix + names[k]: v.contiguous() for k, v in unet_sd.items()}, str(path), metadata=metadata)
    return path


def make_lora(unet_sd, variant: str = "uce", rank: int = 4, alpha: float = 2.0, seed: int = 0,
              scale: float = 0.05):
    """Random low-rank adapters for the selected 2-D weights: {ldm_key: (up, down, alpha)}."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in select(unet_sd, variant).items():
        if v.ndim != 2 or not k.endswith(".weight"):
            continue
        up = torch.randn(v.shape[0], rank, generator=g) * scale
        down = torch.randn(rank, v.shape[1], generator=g) * scale
        out[k] = (up, down, alpha)
    return out


def merged_with_lora(unet_sd, lora, strength: float = 1.0, peft: bool = False):
    """Reference merge: W + strength·(alpha/rank)·up@down (PEFT files carry no alpha: scale 1)."""
    out = {k: v.clone() for k, v in unet_sd.items()}
    for k, (up, down, alpha) in lora.items():
        s = 1.0 if peft else alpha / up.shape[1]
        out[k] = (unet_sd[k].float() + strength * s * (up @ down)).to(unet_sd[k].dtype)
    return out


def write_lora_kohya(path, lora, unet_config):
    names = ldm_to_diffusers_names(unet_config)
    sd = {}
    for k, (up, down, alpha) in lora.items():
        base = "lora_unet_" + names[k][: -len(".weight")].replace(".", "_")
        sd[base + ".lora_up.weight"] = up.contiguous()
        sd[base + ".lora_down.weight"] = down.contiguous()
        sd[base + ".alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path))
    return path


def write_lora_peft(path, lora, unet_config, prefix: str = "unet."):
    names = ldm_to_diffusers_names(unet_config)
    sd = {}
    for k, (up, down, _alpha) in lora.items():
        base = prefix + names[k][: -len(".weight")]
        sd[base + ".lora_B.weight"] = up.contiguous()
        sd[base + ".lora_A.weight"] = down.contiguous()
    save_file(sd, str(path))
    return path
