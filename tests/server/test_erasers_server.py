"""ESD Concept Eraser in a real ComfyUI server via /prompt: train, save, reload, base untouched.

Three prompts on the tiny SD1 checkpoint (random weights; the point is the plumbing, the math is
checked in tests/unit/test_esd.py and tests/inproc/test_erasers.py):
1. the base model sampled alone (before any erasure);
2. the ESD node (few steps, checkpoints on) + sampling with its MODEL + the base again;
3. "Unlearned UNet Loader" on the file the node saved + sampling, and the base once more through
   an equivalent (non-cached) sampler node.
The loader's latents must equal the eraser MODEL's (≤ 1e-5) and every base latent must equal the
first one exactly (the cached base MODEL is never modified by training).
"""
import logging
from pathlib import Path

from safetensors import safe_open

from tests.graphs import Graph, install, latent, txt2img

NAME = "esd_server_test"
STEPS = 4
PX = 32  # 4×4 latents: the tiny UNet has one level, any size works


def test_esd_node_file_reloads_and_base_is_untouched(comfy_server):
    ck = install(comfy_server, "sd1")
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    base0 = txt2img(g, c[0], c[1], prefix="esd_base0", width=PX, height=PX)
    r0 = comfy_server.run(g, timeout=600)
    lat_base0 = latent(comfy_server, r0, base0)

    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    esd = g.add("SafeGen_ESDConceptEraser", model=c[0], clip=c[1], concept="a photo of a cat", variant="x",
                eta=1.0, steps=STEPS, learning_rate=1e-2, seed=0, sampling_steps=3, start_guidance=3.0,
                resolution=PX, xt_sampler="erased", name=NAME, checkpoint_every=2, keep_checkpoints=2,
                preview_every=2, resume=False, vae=c[2])
    plot = g.add("PreviewImage", images=esd[1])
    erased = txt2img(g, esd[0], c[1], prefix="esd_erased", width=PX, height=PX)
    base1 = txt2img(g, c[0], c[1], prefix="esd_base1", width=PX, height=PX)
    r1 = comfy_server.run(g, timeout=900)
    prog = [d for typ, d in r1.events if typ == "progress" and d.get("node") == str(esd)]
    assert prog and max(p["value"] for p in prog) == STEPS and prog[-1]["max"] == STEPS, "progress per step"
    assert r1.images(str(plot)), "loss plot image"
    path = Path(comfy_server.models_dir) / "diffusion_models" / f"{NAME}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["method"] == "ESD" and meta["variant"] == "esd-x" and meta["steps"] == str(STEPS)
    assert meta["concept"] == "a photo of a cat" and len(meta["base_model_hash"]) == 16
    assert keys and all(k.startswith("model.diffusion_model.") and ".attn2." in k for k in keys)
    assert not list(path.parent.glob(".*.tmp"))
    ckdir = Path(comfy_server.output_dir) / "safegen_checkpoints" / "esd" / NAME
    assert sorted(p.name for p in ckdir.glob("step_*.safetensors")) == ["step_0000002.safetensors",
                                                                         "step_0000004.safetensors"]

    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    ld = g.add("SafeGen_UnlearnedUNetLoader", model=c[0], unet_name=path.name, strength=1.0)
    loaded = txt2img(g, ld[0], c[1], prefix="esd_loaded", width=PX, height=PX)
    pos = g.add("CLIPTextEncode", clip=c[1], text="a photo of a cat")
    neg = g.add("CLIPTextEncode", clip=c[1], text="")
    lat = g.add("EmptyLatentImage", width=PX, height=PX, batch_size=1)
    ks = g.add("KSamplerAdvanced", model=c[0], add_noise="enable", noise_seed=7, steps=3, cfg=5.0,
               sampler_name="euler", scheduler="normal", positive=pos[0], negative=neg[0],
               latent_image=lat[0], start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable")
    base2 = g.add("SaveLatent", samples=ks[0], filename_prefix="safegen_test/esd_base2")
    r2 = comfy_server.run(g, timeout=600)

    lt = {"erased": latent(comfy_server, r1, erased), "base1": latent(comfy_server, r1, base1),
          "loaded": latent(comfy_server, r2, loaded), "base2": latent(comfy_server, r2, base2)}
    d = lambda a, b: (lt[a] - b).abs().max().item()  # noqa: E731
    logging.getLogger(__name__).warning(
        "ESD server: loaded vs erased %.3g, erased vs base %.3g, base1/base2 vs base0 %.3g/%.3g",
        d("loaded", lt["erased"]), d("erased", lat_base0), d("base1", lat_base0), d("base2", lat_base0))
    assert d("loaded", lt["erased"]) <= 1e-5, "the file through the loader must reproduce the eraser MODEL"
    assert d("erased", lat_base0) > 1e-5, "the erasure must change the samples"
    assert d("base1", lat_base0) == 0.0 and d("base2", lat_base0) == 0.0, "the cached base must be untouched"
    assert "cross-attention (ESD-x)" in str(r2.ui(str(ld)))
