"""Seeded generator of malformed weight files for the pack's three file loaders.

    python -m tests.fuzz_files --cases 5000 --out /tmp/fuzz   # write the files and a manifest
    SAFEGEN_FUZZ_CASES=20000 pytest tests/server/test_fuzz_loaders.py   # a long run through a server

Targets (each case is one file for one node):

* ``unet``      — Unlearned UNet Loader (``models/diffusion_models``): an ESD-x-style partial file of the
  tiny SD1 UNet, or a kohya LoRA for it;
* ``embedding`` — Load Implicit Negative Embedding (``models/embeddings``): A1111 safetensors/.pt, SDXL-style;
* ``text``      — Safe Text Encoder (``models/text_encoders``): SafeGen delta files and full text-model weights.

Every case is malformed BY CONSTRUCTION — a loader that accepts one has accepted a bad file: truncation,
structural header edits (dtype, offsets, shapes, a 10^12-element shape), integer/bool/float8/NaN tensors,
0-d and empty tensors, wrong widths, junk keys beside good ones, files that would change nothing, empty
files, pickles (one whose ``__reduce__`` would create a marker file: it must never run), incomplete or
inconsistent LoRA adapters — under ordinary and odd file names (spaces, non-ASCII, emoji, ``%``, long).
Mutations never touch a file's values in a way that could leave it valid (no random data bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

DELTA_KIND = "safe_text_encoder_delta"
TARGETS = ("unet", "embedding", "text")
FOLDERS = {"unet": "diffusion_models", "embedding": "embeddings", "text": "text_encoders"}
ODD_NAMES = ("with space", "naïve_ünï", "emoji_🙂", "percent%20x", "日本語", "x" * 150, "dots.in.name", "-dash")
P = "model.diffusion_model."
ATTN = "input_blocks.1.1.transformer_blocks.0.attn2."
TEXT_KEYS = ("text_model.encoder.layers.11.mlp.fc1.weight", "text_model.encoder.layers.11.mlp.fc1.bias",
             "text_model.final_layer_norm.weight")


@dataclass
class Case:
    target: str
    kind: str
    file_name: str
    data: bytes


class _Evil:
    """A pickle payload whose loading would create ``marker``: weights_only loading must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _st(tensors: dict, metadata: dict | None = None) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _pt(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def base_tensors(target: str, g: torch.Generator, sd1: dict) -> tuple[dict, dict | None]:
    """A VALID file's content for ``target`` (tensors, metadata): the mutations start from it."""
    if target == "unet":
        keys = [ATTN + s for s in ("to_k.weight", "to_v.weight", "to_q.weight")]
        return {P + k: sd1[P + k].float() + 0.05 * torch.randn(sd1[P + k].shape, generator=g) for k in keys}, None
    if target == "embedding":
        return {"emb_params": 0.02 * torch.randn(2, 768, generator=g)}, None
    keys = ["clip_l.transformer." + k for k in TEXT_KEYS]
    shapes = {k: sd1["cond_stage_model.transformer." + k[len("clip_l.transformer."):]].shape for k in keys}
    return {k: 1e-3 * torch.randn(s, generator=g) for k, s in shapes.items()}, {"safegen_kind": DELTA_KIND}


def _lora(g, sd1, rank=2, up_rank=None, alpha=1.0, dtype=torch.float32, parts=("up", "down", "alpha"),
          zero_up=False):
    w = sd1[P + ATTN + "to_k.weight"]
    out_f, in_f = w.shape
    m = "lora_unet_" + (ATTN + "to_k").replace(".", "_")
    t = {}
    if "down" in parts:
        t[m + ".lora_down.weight"] = (0.1 * torch.randn(rank, in_f, generator=g)).to(dtype)
    if "up" in parts:
        up = torch.zeros(out_f, up_rank or rank) if zero_up else 0.1 * torch.randn(out_f, up_rank or rank, generator=g)
        t[m + ".lora_up.weight"] = up.to(dtype)
    if "alpha" in parts:
        t[m + ".alpha"] = torch.tensor(alpha) if not isinstance(alpha, torch.Tensor) else alpha
    return t


def _mutations(target: str):
    common = ["truncate", "header_dtype_int", "header_dtype_size", "header_offsets", "header_huge_shape",
              "header_shape_numel", "header_not_json", "int_tensor", "bool_tensor", "nan", "inf", "empty_file",
              "no_tensors", "pickle_evil", "pickle_not_dict", "pickle_empty", "float8_nan", "zero_dim",
              "junk_key", "odd_key"]
    if target == "unet":
        return common + ["shape_mismatch", "identical", "lora_only_down", "lora_only_alpha", "lora_rank_mismatch",
                         "lora_alpha_vector", "lora_zero_up", "lora_rank0", "lora_bool", "lora_junk_key"]
    if target == "embedding":
        return common + ["empty_vectors", "wrong_width", "junk_beside_clip_l", "three_dims", "a1111_two_params",
                         "a1111_not_tensor", "sdxl_missing_g_on_junk"]
    return common + ["delta_zero", "delta_unknown_key", "full_identical", "full_foreign_keys", "full_shape"]


def make_case(i: int, seed: int, sd1: dict, marker_dir: str) -> Case:
    rng = random.Random(seed * 1_000_003 + i)
    g = torch.Generator().manual_seed(seed * 7919 + i)
    target = TARGETS[i % 3]
    kind = rng.choice(_mutations(target))
    stem = f"fz{i:05d}_{kind}"
    if rng.random() < 0.25:
        stem = f"{stem}_{rng.choice(ODD_NAMES)}"
    tensors, meta = base_tensors(target, g, sd1)
    ext = ".safetensors"
    data = None
    k0 = next(iter(tensors))

    if kind == "truncate":
        full = _st(tensors, meta)
        data = full[:rng.randrange(0, len(full) - 1)]
    elif kind.startswith("header_"):
        header, body = _split(_st(tensors, meta))
        key = rng.choice([k for k in header if k != "__metadata__"])
        ent = header[key]
        if kind == "header_dtype_int":
            ent["dtype"] = "I32"  # same size as F32: an integer tensor where weights are expected
        elif kind == "header_dtype_size":
            ent["dtype"] = "F16"  # half the bytes the offsets hold
        elif kind == "header_offsets":
            ent["data_offsets"] = [ent["data_offsets"][0], ent["data_offsets"][1] + 4 * rng.randint(1, 10 ** 6)]
        elif kind == "header_huge_shape":
            ent["shape"] = [10 ** 6, 10 ** 6]
        elif kind == "header_shape_numel":
            ent["shape"] = [int(ent["shape"][0]) + 1] + [int(d) for d in ent["shape"][1:]]
        else:  # header_not_json
            raw = _st(tensors, meta)
            n = struct.unpack("<Q", raw[:8])[0]
            data = raw[:8] + b"{" + b"\x00" * (n - 1) + raw[8 + n:]
        if data is None:
            data = _join(header, body)
    elif kind in ("int_tensor", "bool_tensor"):
        tensors[k0] = (tensors[k0] * 100).to(torch.int32) if kind == "int_tensor" else tensors[k0] > 0
    elif kind in ("nan", "inf"):
        t = tensors[k0].clone()
        t.view(-1)[rng.randrange(t.numel())] = float("nan") if kind == "nan" else float("inf")
        tensors[k0] = t
    elif kind == "float8_nan":
        t = tensors[k0].clone()
        t.view(-1)[0] = float("nan")
        tensors[k0] = t.to(torch.float8_e4m3fn)
    elif kind == "empty_file":
        data = b""
    elif kind == "no_tensors":
        data = _st({}, meta)
    elif kind == "pickle_evil":
        ext = ".pt"
        data = _pt({k0: tensors[k0], "x": _Evil(os.path.join(marker_dir, f"{stem}.ran"))})
    elif kind == "pickle_not_dict":
        ext = ".pt"
        data = _pt([1, 2, 3])
    elif kind == "pickle_empty":
        ext = ".pt"
        data = pickle.dumps(None)
    elif kind == "zero_dim":
        tensors[k0] = torch.tensor(0.5)
    elif kind == "junk_key":
        tensors["foo.bar"] = torch.randn(3, generator=g)
    elif kind == "odd_key":
        tensors[rng.choice(["../x", "vision_model.encoder.layers.0.mlp.fc1.weight", "lm_head.weight", "a b"])] = \
            torch.randn(4, 4, generator=g)
    # ---- unet
    elif kind == "shape_mismatch":
        tensors[k0] = torch.randn(tensors[k0].shape[0] + 1, tensors[k0].shape[1], generator=g)
    elif kind == "identical":
        tensors = {k: sd1[k].float().clone() for k in tensors}
    elif kind.startswith("lora_"):
        opts = {"lora_only_down": dict(parts=("down",)), "lora_only_alpha": dict(parts=("alpha",)),
                "lora_rank_mismatch": dict(rank=2, up_rank=3), "lora_alpha_vector": dict(alpha=torch.ones(4)),
                "lora_zero_up": dict(zero_up=True), "lora_rank0": dict(rank=0),
                "lora_bool": dict(dtype=torch.bool), "lora_junk_key": dict()}[kind]
        tensors = _lora(g, sd1, **opts)
        if kind == "lora_junk_key":
            tensors["lora_unet_" + (ATTN + "to_v").replace(".", "_") + ".lora_down.weight"] = torch.randn(2, 768)
        meta = None
    # ---- embedding
    elif kind == "empty_vectors":
        tensors = {"emb_params": torch.zeros(0, 768)}
    elif kind == "wrong_width":
        tensors = {"emb_params": torch.randn(2, rng.choice([767, 769, 1024, 1280, 4]), generator=g)}
    elif kind == "junk_beside_clip_l":
        tensors = {"clip_l": torch.randn(1, 768, generator=g), "junk": torch.randn(1, 768, generator=g)}
    elif kind == "three_dims":
        tensors = {"emb_params": torch.randn(1, 2, 768, generator=g)}
    elif kind == "a1111_two_params":
        ext = ".pt"
        data = _pt({"string_to_param": {"*": torch.randn(1, 768), "#": torch.randn(1, 768)}, "name": "x", "step": 3})
    elif kind == "a1111_not_tensor":
        ext = ".pt"
        data = _pt({"string_to_param": {"*": [1.0, 2.0]}, "name": "x"})
    elif kind == "sdxl_missing_g_on_junk":
        tensors = {"clip_g": torch.randn(1, 1280, generator=g)}  # an SDXL-only (CLIP-G) file on an SD1 CLIP
    # ---- text encoder
    elif kind == "delta_zero":
        tensors = {k: torch.zeros_like(v) for k, v in tensors.items()}
    elif kind == "delta_unknown_key":
        tensors["clip_l.transformer.text_model.encoder.layers.99.mlp.fc1.weight"] = torch.randn(3, 3)
    elif kind == "full_identical":
        tensors = {k: sd1["cond_stage_model.transformer." + k].float().clone() for k in TEXT_KEYS}
        meta = None
    elif kind == "full_foreign_keys":
        tensors = {k: sd1["cond_stage_model.transformer." + k].float() + 0.01 for k in TEXT_KEYS}
        tensors[rng.choice(["lm_head.weight", "vision_model.post_layernorm.weight", "foo.bar"])] = torch.randn(8)
        meta = None
    elif kind == "full_shape":
        k = TEXT_KEYS[0]
        tensors = {k: torch.randn(7, 5, generator=g)}
        meta = None
    if data is None:
        data = _st(tensors, meta)
    return Case(target, kind, stem + ext, data)


def load_sd1() -> dict:
    from safetensors.torch import load_file

    from tools.tiny_models import ensure
    return load_file(str(ensure("sd1")))


def generate(n: int, seed: int = 0, marker_dir: str = "/tmp"):
    sd1 = load_sd1()
    for i in range(n):
        yield make_case(i, seed, sd1, marker_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    manifest = []
    for c in generate(a.cases, a.seed, str(a.out)):
        d = a.out / FOLDERS[c.target]
        d.mkdir(parents=True, exist_ok=True)
        (d / c.file_name).write_bytes(c.data)
        manifest.append({"target": c.target, "kind": c.kind, "file": c.file_name})
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    print(f"{len(manifest)} cases in {a.out}")  # noqa: T201 - CLI output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
