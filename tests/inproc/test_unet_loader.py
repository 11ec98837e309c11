"""Unlearned UNet Loader against ComfyUI's own loaders, in-process on the tiny SD1 checkpoint.

References: core's UNETLoader path (`comfy.sd.load_diffusion_model`) on the same file, a
diffusers-layout twin of the same weights, and an independent merge of LoRA factors.
"""
import pytest
import torch

from tests.packload import comfy_ready, pack_module

comfy_ready()
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402

from tools import unlearned_files as UF  # noqa: E402
from tools.tiny_models import ensure  # noqa: E402

P = "diffusion_model."


@pytest.fixture(scope="module")
def base():
    mp, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(ensure("sd1")), output_vae=True,
                                                              output_clip=False)
    return mp


@pytest.fixture(scope="module")
def loader():
    return pack_module("safegen_comfy.unlearned")


def unet_sd(mp):
    """The patcher's own UNet weights, even while a patched clone sharing the module is loaded."""
    return {k[len(P):]: v[0][0].detach().clone() for k, v in mp.get_key_patches(P).items()}


def predict(mp, seed=0):
    """Noise prediction of the (patched) UNet on a fixed input."""
    mm.load_models_gpu([mp], force_full_load=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        return mp.model.diffusion_model(x, timesteps=t, context=ctx).clone()


def weights_after_load(mp):
    mm.load_models_gpu([mp], force_full_load=True)
    return {k: v.detach().clone() for k, v in mp.model.diffusion_model.state_dict().items()}


def test_full_file_matches_core_unetloader_and_diffusers_twin(base, loader, tmp_path):
    sd = unet_sd(base)
    unl = UF.perturb(sd, "all", seed=1)
    ldm = UF.write_ldm(tmp_path / "full.safetensors", unl)
    dif = UF.write_diffusers(tmp_path / "full_diffusers.safetensors", unl, base.model.model_config.unet_config)
    ref = predict(comfy.sd.load_diffusion_model(str(ldm)))
    base_pred = predict(base)
    m, info = loader.apply_unlearned(base, str(ldm), 1.0)
    got = predict(m)
    assert info["kind"] == "full UNet" and info["tensors"] == len(sd)
    assert (got - ref).abs().max().item() <= 1e-5
    assert (ref - base_pred).abs().max().item() > 1e-3  # the file really differs from the base
    m2, info2 = loader.apply_unlearned(base, str(dif), 1.0)
    assert info2["format"] == "diffusers"
    assert (predict(m2) - got).abs().max().item() <= 1e-5
    # the cached base is untouched after the patched clones ran
    assert torch.equal(predict(base), base_pred)
    # the same file loads without a base, like core's UNETLoader
    m3, _ = loader.load_without_base(str(ldm), 1.0)
    assert (predict(m3) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant,layout", [("esd-x", "ldm"), ("esd-u", "diffusers"), ("uce", "diffusers"),
                                            ("uce", "ldm")])
def test_partial_changes_exactly_its_tensors(base, loader, tmp_path, variant, layout):
    sd = unet_sd(base)
    part = UF.select(UF.perturb(sd, variant, seed=2), variant)
    f = tmp_path / f"{variant}.safetensors"
    if layout == "ldm":
        UF.write_ldm(f, part, prefix="")
    else:
        UF.write_diffusers(f, part, base.model.model_config.unet_config, prefix="unet.")
    m, info = loader.apply_unlearned(base, str(f), 1.0)
    assert info["tensors"] == len(part)
    w = weights_after_load(m)
    for k, v in w.items():
        if k in part:
            assert torch.equal(v, part[k].reshape(v.shape)), k
        else:
            assert torch.equal(v, sd[k]), k
    m0, _ = loader.apply_unlearned(base, str(f), 0.0)
    assert torch.equal(predict(m0), predict(base))
    mh, _ = loader.apply_unlearned(base, str(f), 0.5)
    wh = weights_after_load(mh)
    k0 = next(iter(part))
    assert torch.allclose(wh[k0], 0.5 * (sd[k0] + part[k0].reshape(sd[k0].shape)), atol=1e-6)


@pytest.mark.parametrize("style", ["kohya", "peft"])
def test_lora_adapters_match_reference_merge(base, loader, tmp_path, style):
    sd = unet_sd(base)
    cfg = base.model.model_config.unet_config
    lora = UF.make_lora(sd, "esd-x", rank=4, alpha=2.0, seed=3)
    f = tmp_path / f"lora_{style}.safetensors"
    (UF.write_lora_kohya if style == "kohya" else UF.write_lora_peft)(f, lora, cfg)
    m, info = loader.apply_unlearned(base, str(f), 0.7)
    assert info["format"] == "lora" and info["tensors"] == len(lora)
    ref = UF.merged_with_lora(sd, lora, 0.7, peft=(style == "peft"))
    w = weights_after_load(m)
    for k in lora:
        assert torch.allclose(w[k], ref[k], atol=1e-5), k


def test_bad_inputs_are_named(base, loader, tmp_path):
    sd = unet_sd(base)
    k = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    xl = tmp_path / "sdxl_partial.safetensors"
    UF.write_ldm(xl, {k: torch.zeros(sd[k].shape[0], 2048)}, prefix="")
    with pytest.raises(loader.WeightFileError, match=r"sdxl_partial.safetensors.*SDXL.*SD1.x.*attn2.to_k"):
        loader.apply_unlearned(base, str(xl), 1.0)
    nan = tmp_path / "nan.safetensors"
    t = sd[k].clone()
    t[0, 0] = float("nan")
    UF.write_ldm(nan, {k: t}, prefix="")
    with pytest.raises(loader.WeightFileError, match="nan.safetensors: 1 tensor.*attn2.to_k"):
        loader.apply_unlearned(base, str(nan), 1.0)
    odd = tmp_path / "odd.safetensors"
    UF.write_ldm(odd, {k: sd[k], "input_blocks.99.0.weight": torch.zeros(3)}, prefix="")
    with pytest.raises(loader.WeightFileError, match="odd.safetensors: 1 key.*input_blocks.99.0.weight"):
        loader.apply_unlearned(base, str(odd), 1.0)
    lo = tmp_path / "lora_bad.safetensors"
    from safetensors.torch import save_file
    save_file({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4)}, str(lo))
    with pytest.raises(loader.WeightFileError, match="lora_bad.safetensors: 2 LoRA key.*down_blocks_7"):
        loader.apply_unlearned(base, str(lo), 1.0)
    part = tmp_path / "part.safetensors"
    UF.write_ldm(part, {k: sd[k]}, prefix="")
    with pytest.raises(loader.WeightFileError, match="part.safetensors: strength 0.5 needs a base MODEL"):
        loader.load_without_base(str(part), 0.5)
