"""Unlearned UNet Loader inside a real ComfyUI server, driven through POST /prompt + websocket.

Reference: core's UNETLoader on the same full file (same seed, same sampler) — the sampled
latents must agree; the base branch must be unaffected (cache not poisoned).
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.graphs import Graph, install, latent, txt2img
from tools.comfy_host import ExecutionError
from tools.tiny_models import ensure

P = "model.diffusion_model."


def unlearned_files(kind, folder, seed=1):
    """(full LDM file, partial UCE-style file) made from the tiny checkpoint's UNet, fp16."""
    sd = {k[len(P):]: v for k, v in load_file(str(ensure(kind))).items() if k.startswith(P)}
    g = torch.Generator().manual_seed(seed)
    unl = {}
    for k, v in sd.items():
        if ".attn2." in k or "out." in k[:4]:
            unl[k] = (v.float() + 0.5 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
        else:
            unl[k] = v
    full = folder / f"{kind}_full_unlearned.safetensors"
    save_file({P + k: v.contiguous() for k, v in unl.items()}, str(full))
    part = folder / f"{kind}_uce_partial.safetensors"
    save_file({k: unl[k].contiguous() for k in unl if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))},
              str(part))
    return full, part


def run_loader_graph(server, kind, full, part, tag):
    ck = install(server, kind)
    fu = install(server, full, "diffusion_models")
    pa = install(server, part, "diffusion_models")
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    ref = g.add("UNETLoader", unet_name=fu, weight_dtype="default")
    ours = g.add("SafeGen_UnlearnedUNetLoader", model=c[0], unet_name=fu, strength=1.0)
    zero = g.add("SafeGen_UnlearnedUNetLoader", model=c[0], unet_name=pa, strength=0.0)
    part1 = g.add("SafeGen_UnlearnedUNetLoader", model=c[0], unet_name=pa, strength=1.0)
    n = {"ref": txt2img(g, ref[0], c[1], prefix=f"{tag}_ref"),
         "ours": txt2img(g, ours[0], c[1], prefix=f"{tag}_ours"),
         "base": txt2img(g, c[0], c[1], prefix=f"{tag}_base"),
         "zero": txt2img(g, zero[0], c[1], prefix=f"{tag}_zero"),
         "part": txt2img(g, part1[0], c[1], prefix=f"{tag}_part")}
    r = server.run(g, timeout=900)
    out = {k: latent(server, r, v) for k, v in n.items()}
    info = r.ui(str(ours))
    # A later prompt: the base model, sampled by an equivalent node so the result is not a cache hit.
    g2 = Graph()
    c2 = g2.add("CheckpointLoaderSimple", ckpt_name=ck)
    pos = g2.add("CLIPTextEncode", clip=c2[1], text="a photo of a cat")
    neg = g2.add("CLIPTextEncode", clip=c2[1], text="")
    lat = g2.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g2.add("KSamplerAdvanced", model=c2[0], add_noise="enable", noise_seed=7, steps=3, cfg=5.0,
                sampler_name="euler", scheduler="normal", positive=pos[0], negative=neg[0], latent_image=lat[0],
                start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable")
    sv = g2.add("SaveLatent", samples=ks[0], filename_prefix=f"safegen_test/{tag}_base_again")
    r2 = server.run(g2, timeout=600)
    out["base_again"] = latent(server, r2, sv)
    return out, info


def check(out, info):
    d = lambda a, b: (out[a] - out[b]).abs().max().item()  # noqa: E731
    assert d("ours", "ref") <= 1e-5, "strength 1 must reproduce core UNETLoader on the same file"
    assert d("ours", "base") > 1e-3, "the unlearned weights must change the result"
    assert d("zero", "base") == 0.0, "strength 0 must equal the base exactly"
    assert d("part", "base") > 1e-4
    assert d("base_again", "base") == 0.0, "the cached base must not be poisoned by the patched clones"
    assert "full UNet" in str(info)


def test_sd1_loader_through_server(comfy_server, tmp_path):
    full, part = unlearned_files("sd1", tmp_path)
    out, info = run_loader_graph(comfy_server, "sd1", full, part, "sd1")
    check(out, info)


def test_bad_file_is_a_clear_error_and_server_keeps_serving(comfy_server, tmp_path):
    ck = install(comfy_server, "sd1")
    xl = {k[len(P):]: v for k, v in load_file(str(ensure("sdxl"))).items()
          if k.startswith(P) and "attn2.to_k" in k}
    bad = tmp_path / "sdxl_esd_x.safetensors"
    save_file({k: v.contiguous() for k, v in list(xl.items())[:3]}, str(bad))
    name = install(comfy_server, bad, "diffusion_models")
    trunc = tmp_path / "truncated_unet.safetensors"
    trunc.write_bytes(bad.read_bytes()[:1000])
    tname = install(comfy_server, trunc, "diffusion_models")
    for fname, pattern in ((name, "sdxl_esd_x.safetensors.*SDXL.*SD1"), (tname, "truncated_unet.safetensors.*corrupt")):
        g = Graph()
        c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
        u = g.add("SafeGen_UnlearnedUNetLoader", model=c[0], unet_name=fname, strength=1.0)
        txt2img(g, u[0], c[1], prefix="bad")
        with pytest.raises(ExecutionError) as e:
            comfy_server.run(g, timeout=300)
        import re
        assert re.search(pattern, e.value.exception_message), e.value.exception_message
        assert e.value.node_type == "SafeGen_UnlearnedUNetLoader"
    g = Graph()
    g.add("SaveImage", images=g.add("EmptyImage", width=8, height=8, batch_size=1, color=0)[0],
          filename_prefix="safegen_test/alive")
    assert comfy_server.run(g, timeout=60).status.get("status_str") == "success"


@pytest.mark.sdxl
def test_sdxl_loader_through_server(comfy_server, tmp_path):
    full, part = unlearned_files("sdxl", tmp_path)
    out, info = run_loader_graph(comfy_server, "sdxl", full, part, "sdxl")
    check(out, info)
