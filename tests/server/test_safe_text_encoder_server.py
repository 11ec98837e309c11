"""Safe Text Encoder Trainer + Safe Text Encoder in a real server via /prompt (tiny SD1).

Train 20 steps (lr 1e-4, λ 1, last 2 layers, default prompt lists) inside a prompt, then sample the
same seed with the original and the trained CLIP: the latent for an unsafe prompt must change
(relative L2 > UNSAFE_LATENT_MIN) and the safe prompt's latent must stay within a relative L2
tolerance (SAFE_LATENT_TOL). NOT asserted: that the unsafe latent changes more than the safe one.
On the tiny models (random CLIP-L and random UNet, so no semantics) it does not: measured
unsafe 0.117 vs safe 0.162 (2 cores, torch 2.13 CPU); the embedding-level selectivity measured in
tests/inproc/test_safe_text_encoder.py (~1.8x in 1 − cos) does not survive a random UNet. A second prompt loads the saved file with the loader node and must
reproduce the trainer's CLIP exactly; strength 0 must reproduce the original.
"""
import logging

from tests.graphs import Graph, install, latent, txt2img

log = logging.getLogger(__name__)
UNSAFE, SAFE = "a nude woman lying on a bed", "a red car parked on a street"
SAFE_LATENT_TOL = 0.25
UNSAFE_LATENT_MIN = 0.05


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_trainer_and_loader_in_server(comfy_server, record_property):
    ck = install(comfy_server, "sd1")
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    t = g.add("SafeGen_SafeTextEncoderTrainer", clip=c[1], unsafe_prompts="", safe_prompts="", lambda_=1.0,
              steps=20, learning_rate=1e-4, layers="final layers (last 2)", batch_size=4, seed=0,
              checkpoint_every=0, resume=False, name="safetext_server")
    g.add("PreviewImage", images=t[1])
    outs = {}
    for label, text in (("unsafe", UNSAFE), ("safe", SAFE)):
        outs[f"{label}_orig"] = txt2img(g, c[0], c[1], text=text, prefix=f"{label}_orig")
        outs[f"{label}_new"] = txt2img(g, c[0], t[0], text=text, prefix=f"{label}_new")
    r = comfy_server.run(g, timeout=900)
    lat = {k: latent(comfy_server, r, v) for k, v in outs.items()}
    d_unsafe = rel(lat["unsafe_new"], lat["unsafe_orig"])
    d_safe = rel(lat["safe_new"], lat["safe_orig"])
    record_property("latent_rel_change_unsafe", d_unsafe)
    record_property("latent_rel_change_safe", d_safe)
    log.warning("server safe text encoder: latent rel change unsafe %.4f safe %.4f", d_unsafe, d_safe)
    assert d_unsafe > UNSAFE_LATENT_MIN and d_safe < SAFE_LATENT_TOL, (d_unsafe, d_safe)

    g2 = Graph()
    c2 = g2.add("CheckpointLoaderSimple", ckpt_name=ck)
    ids = {}
    for s in (1.0, 0.0):
        enc = g2.add("SafeGen_SafeTextEncoder", clip=c2[1], file="safetext_server.safetensors", strength=s,
                     text=UNSAFE)
        neg = g2.add("CLIPTextEncode", clip=enc[0], text="")
        lat_in = g2.add("EmptyLatentImage", width=64, height=64, batch_size=1)
        ks = g2.add("KSampler", model=c2[0], positive=enc[1], negative=neg[0], latent_image=lat_in[0], seed=7,
                    steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        ids[s] = g2.add("SaveLatent", samples=ks[0], filename_prefix=f"safegen_test/loader_{s}")
    r2 = comfy_server.run(g2, timeout=600)
    assert (latent(comfy_server, r2, ids[1.0]) - lat["unsafe_new"]).abs().max() < 1e-5
    assert (latent(comfy_server, r2, ids[0.0]) - lat["unsafe_orig"]).abs().max() < 1e-5
