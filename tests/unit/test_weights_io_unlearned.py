"""Unit tests of the comfy-free file handling and unlearned-weight planning."""
import os
import pickle

import pytest
import torch

from safegen_core import unlearned as U
from safegen_core.weights_io import (WeightFileError, check_finite, read_weight_file,
                                     sanitize_name, save_safetensors_atomic)

BASE = {
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight": (320, 320),
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "out.2.weight": (4, 320, 3, 3),
}
DMAP = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight":
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.0.attentions.0.proj_in.weight": "input_blocks.1.1.proj_in.weight",
}


def test_detect_layout():
    assert U.detect_layout(["model.diffusion_model.input_blocks.0.0.weight"]) == "ldm"
    assert U.detect_layout(["input_blocks.0.0.weight", "out.2.bias"]) == "ldm"
    assert U.detect_layout(["unet.down_blocks.0.attentions.0.proj_in.weight"]) == "diffusers"
    assert U.detect_layout(["down_blocks.0.resnets.0.conv1.weight"]) == "diffusers"
    assert U.detect_layout(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]) == "lora"
    assert U.detect_layout(["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"]) == "lora"
    with pytest.raises(WeightFileError, match="no UNet keys"):
        U.detect_layout(["foo.bar", "baz"])


def test_plan_partial_variants():
    p = U.plan_patches({"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
                        "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight": (320, 768)}, BASE, None)
    assert not p.is_full and "UCE" in p.variant
    p = U.plan_patches({"input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight": (320, 320)}, BASE, None)
    assert p.variant.startswith("partial: cross-attention (ESD-x)")
    p = U.plan_patches({"model.diffusion_model.out.2.weight": (4, 320, 3, 3)}, BASE, None)
    assert "ESD-u" in p.variant and p.entries[0].model_key == "out.2.weight"
    p = U.plan_patches({k: s for k, s in BASE.items()}, BASE, None)
    assert p.is_full and p.variant == "full UNet"


def test_plan_diffusers_and_singleton_shapes():
    # diffusers keys map through the table; a linear-shaped proj_in fits a 1x1 conv weight.
    p = U.plan_patches({"unet.down_blocks.0.attentions.0.proj_in.weight": (320, 320),
                        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
                       BASE, DMAP)
    assert sorted(p.model_keys) == sorted(DMAP.values())
    t = torch.randn(320, 320)
    assert U.fit_to(t, (320, 320, 1, 1)).shape == (320, 320, 1, 1)


def test_plan_errors_name_keys_and_family():
    with pytest.raises(WeightFileError) as e:
        U.plan_patches({"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 2048)}, BASE, None,
                       name="xl.safetensors")
    msg = str(e.value)
    assert "xl.safetensors" in msg and "attn2.to_k" in msg and "SDXL" in msg and "SD1.x" in msg
    with pytest.raises(WeightFileError, match="match no tensor.*label_emb.0.0.weight"):
        U.plan_patches({"label_emb.0.0.weight": (1280, 2816)}, BASE, None)
    # non-UNet keys of a whole checkpoint are reported, not errors
    p = U.plan_patches({"model.diffusion_model.out.2.weight": (4, 320, 3, 3),
                        "cond_stage_model.transformer.x": (3,)}, BASE, None)
    assert p.ignored_non_unet == ["cond_stage_model.transformer.x"]


def test_blend_exact_endpoints():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.equal(U.blend(a, b, 0.0), a)
    assert torch.equal(U.blend(a, b, 1.0), b)
    assert torch.allclose(U.blend(a, b, 0.25), a + 0.25 * (b - a), atol=1e-6)
    for s in (0.0, 0.25, 1.0):  # the in-place form used by the patch is bitwise the same
        assert torch.equal(U.blend_(a.clone(), b, s), U.blend(a, b, s))


def test_atomic_save_roundtrip_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    save_safetensors_atomic({"a": torch.ones(3)}, str(path), {"steps": 5, "concept": "nudity"})
    wf = read_weight_file(str(path))
    assert torch.equal(wf.tensors["a"], torch.ones(3)) and wf.metadata == {"steps": "5", "concept": "nudity"}
    import safetensors.torch as st

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors_atomic({"a": torch.zeros(3)}, str(path))
    assert os.listdir(tmp_path) == ["x.safetensors"]  # no temp file left, old file intact
    assert torch.equal(read_weight_file(str(path)).tensors["a"], torch.ones(3))


def test_corrupt_truncated_and_pickle(tmp_path):
    good = tmp_path / "g.safetensors"
    save_safetensors_atomic({"a": torch.randn(64, 64)}, str(good))
    data = good.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="trunc.safetensors.*truncated or corrupt"):
        read_weight_file(str(bad))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 100)
    with pytest.raises(WeightFileError, match="junk.safetensors"):
        read_weight_file(str(junk))
    # a plain tensor .pt loads with weights_only=True, nested state dicts are unwrapped
    pt = tmp_path / "ok.pt"
    torch.save({"model_state_dict": {"w": torch.ones(2)}, "epoch": 3}, pt)
    assert torch.equal(read_weight_file(str(pt)).tensors["w"], torch.ones(2))
    # a pickle that needs code is refused with a message naming the file
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(WeightFileError, match="evil.ckpt: refused to load.*weights_only=True"):
        read_weight_file(str(evil))


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_nan_inf_named():
    with pytest.raises(WeightFileError, match="f.safetensors: 2 tensor.*b, c"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([float("nan")]), "c": torch.tensor([float("inf")])},
                     "f.safetensors")


def test_sanitize_name():
    assert sanitize_name("../../etc/passwd") == "passwd"
    assert sanitize_name("my concept!.safetensors") == "my_concept"
    assert sanitize_name("   ") == "unnamed"
