"""SLD and SAFREE nodes (nodes/guidance.py) in a real ComfyUI server on the tiny checkpoints.

Each test queues ONE prompt with several sampler branches ending in SaveLatent and compares the
latents. The tiny models have random weights: the tests check the mechanics (exact no-op cases,
movement and its growth with the SLD scale, guider = model patch, SAFREE's filtered tokens), not
image content. Which prompt tokens SAFREE flags is arbitrary with a random CLIP; every test reads
the node's report and asserts the flag count it relies on.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.graphs import Graph, install, latent

STEPS = 4
CFG = 5.0
SEED = 7
SAFETY_TEXT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, "
               "sexual, nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, "
               "vandalism, weapons, child abuse, brutality, cruelty")
NUDITY = "\n".join([
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity",
    "Pornography", "Erotic Art", "Lustful", "Seductive", "Orgasmic", "Libido",
    "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
    "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification"])
HIT_PROMPT = "a photo of a nude woman on the beach"
FAR_PROMPT = "mountain lake"  # no token flagged against the nudity list with the tiny SD1 CLIP


def ksampler(g, model, pos, neg, lat, prefix, steps=STEPS, cfg=CFG):
    ks = g.add("KSampler", model=model, positive=pos, negative=neg, latent_image=lat, seed=SEED, steps=steps,
               cfg=cfg, sampler_name="euler", scheduler="normal", denoise=1.0)
    return g.add("SaveLatent", samples=ks[0], filename_prefix=f"safegen_test/guid_{prefix}")


def sld(g, model, safety, gs, warmup=0, threshold=0.01, mom=0.0, beta=0.0, preset="custom"):
    return g.add("SafeGen_SLDGuidance", model=model, safety=safety, preset=preset, warmup_steps=warmup,
                 guidance_scale=gs, threshold=threshold, momentum_scale=mom, momentum_beta=beta)


def write_embedding(server, name, kind):
    gen = torch.Generator().manual_seed(123)
    if kind == "sd1":
        t = {"emb_params": torch.randn(2, 768, generator=gen) * 0.02}
    else:
        t = {"clip_l": torch.randn(1, 768, generator=gen) * 0.02,
             "clip_g": torch.randn(1, 1280, generator=gen) * 0.02}
    path = server.models_dir / "embeddings" / f"{name}.safetensors"
    if not path.exists():
        save_file(t, str(path))
    return path.name


def report_text(res, node_id) -> str:
    return "\n".join(res.ui(node_id)["text"])


def dist(a, b) -> float:
    return float((a - b).norm())


def test_node_schemas(comfy_server):
    info = comfy_server.object_info()
    for nid in ("SafeGen_SLDGuidance", "SafeGen_SLDGuider", "SafeGen_SAFREEPromptFilter",
                "SafeGen_SAFREEReattention"):
        assert nid in info, sorted(k for k in info if k.startswith("SafeGen_"))
        assert info[nid]["category"] == "SafeGen/guidance" and info[nid]["description"]
        for section in ("required", "optional"):
            for name, spec in info[nid]["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), (nid, name)
        assert all(info[nid]["output_tooltips"]), nid
    spec = info["SafeGen_SLDGuidance"]["input"]["required"]["preset"]
    options = spec[0] if isinstance(spec[0], list) else spec[1].get("options")
    assert options == ["weak", "medium", "strong", "max", "custom"]
    assert info["SafeGen_SLDGuider"]["output"] == ["GUIDER"]
    assert info["SafeGen_SAFREEPromptFilter"]["input"]["optional"]["embedding"][0] == "SAFEGEN_EMBEDDING"


def test_sld_sd1_noop_scale_guider_and_ine(comfy_server):
    ck = install(comfy_server, "sd1")
    emb = write_embedding(comfy_server, "guid_ine_sd1", "sd1")
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    pos = g.add("CLIPTextEncode", clip=c[1], text="a photo of a cat")
    neg = g.add("CLIPTextEncode", clip=c[1], text="")
    saf = g.add("CLIPTextEncode", clip=c[1], text=SAFETY_TEXT)
    ine = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=c[1], embedding_name=emb, text="{}",
                strength=1.0)
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    out = {"plain": ksampler(g, c[0], pos[0], neg[0], lat[0], "plain"),
           "gs0": ksampler(g, sld(g, c[0], saf[0], 0.0)[0], pos[0], neg[0], lat[0], "gs0"),
           "warm": ksampler(g, sld(g, c[0], saf[0], 1000.0, warmup=STEPS)[0], pos[0], neg[0], lat[0], "warm"),
           "medium": ksampler(g, sld(g, c[0], saf[0], 0.0, preset="medium")[0], pos[0], neg[0], lat[0],
                              "medium"),
           "max": ksampler(g, sld(g, c[0], saf[0], 0.0, preset="max")[0], pos[0], neg[0], lat[0], "max"),
           "ine": ksampler(g, sld(g, c[0], ine[0], 50.0)[0], pos[0], neg[0], lat[0], "ine")}
    scales = (2.0, 5.0, 50.0)
    for s in scales:
        out[s] = ksampler(g, sld(g, c[0], saf[0], s)[0], pos[0], neg[0], lat[0], f"s{s:g}")
    guider = g.add("SafeGen_SLDGuider", model=c[0], positive=pos[0], negative=neg[0], safety=saf[0], cfg=CFG,
                   preset="custom", warmup_steps=0, guidance_scale=50.0, threshold=0.01, momentum_scale=0.0,
                   momentum_beta=0.0)
    noise = g.add("RandomNoise", noise_seed=SEED)
    sampler = g.add("KSamplerSelect", sampler_name="euler")
    sigmas = g.add("BasicScheduler", model=c[0], scheduler="normal", steps=STEPS, denoise=1.0)
    sca = g.add("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=sampler[0],
                sigmas=sigmas[0], latent_image=lat[0])
    out["guider"] = g.add("SaveLatent", samples=sca[0], filename_prefix="safegen_test/guid_guider")
    r = comfy_server.run(g, timeout=900)
    L = {k: latent(comfy_server, r, v) for k, v in out.items()}
    plain = L["plain"]
    assert torch.isfinite(plain).all()
    # (a) no-op settings give exactly the plain KSampler CFG result
    assert torch.equal(L["gs0"], plain)
    assert torch.equal(L["warm"], plain)
    # medium's warm-up is 20% of the run (10 of diffusers' 50 steps): 1 of these 4 steps, so it acts
    # (with the old absolute 10 steps it would have been a no-op here)
    assert dist(L["medium"], plain) > 1e-3 * float(plain.norm())
    # (b) a safety concept moves the latent, more with a larger SLD scale
    d = [dist(L[s], plain) for s in scales]
    assert d[0] > 1e-3 * float(plain.norm()), d
    assert d[0] < d[1] < d[2], d
    assert dist(L["max"], plain) > 1e-3 * float(plain.norm())
    # the GUIDER computes the same as the MODEL patch with the stock KSampler
    assert torch.equal(L["guider"], L[50.0])
    # an implicit negative embedding as the safety concept works and differs from the text concept
    assert dist(L["ine"], plain) > 1e-3 * float(plain.norm())
    assert not torch.allclose(L["ine"], L[50.0])


def test_sld_batch_of_two_matches_single_images(comfy_server):
    ck = install(comfy_server, "sd1")
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    pos = g.add("CLIPTextEncode", clip=c[1], text="a photo of a cat")
    neg = g.add("CLIPTextEncode", clip=c[1], text="")
    saf = g.add("CLIPTextEncode", clip=c[1], text=SAFETY_TEXT)
    m = sld(g, c[0], saf[0], 100.0, warmup=1, threshold=0.0, mom=0.5, beta=0.6)
    lat2 = g.add("EmptyLatentImage", width=64, height=64, batch_size=2)
    both = ksampler(g, m[0], pos[0], neg[0], lat2[0], "batch2")
    # LatentFromBatch keeps batch_index, so KSampler draws the same noise as for image 1 of the batch
    second = g.add("LatentFromBatch", samples=lat2[0], batch_index=1, length=1)
    alone = ksampler(g, m[0], pos[0], neg[0], second[0], "batch_single")
    r = comfy_server.run(g, timeout=900)
    b, a = latent(comfy_server, r, both), latent(comfy_server, r, alone)
    assert b.shape[0] == 2 and a.shape[0] == 1
    torch.testing.assert_close(b[1:2], a, rtol=0, atol=2e-4 * float(a.abs().max()))


def test_safree_sd1_filter_svf_reattention_and_far_prompt(comfy_server):
    ck = install(comfy_server, "sd1")
    emb = write_embedding(comfy_server, "guid_ine_sd1", "sd1")
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    neg = g.add("CLIPTextEncode", clip=c[1], text="")
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)

    def filt(text, svf=False, up_t=10, embedding=None):
        kw = {"embedding": embedding} if embedding is not None else {}
        return g.add("SafeGen_SAFREEPromptFilter", clip=c[1], text=text, toxic_concepts=NUDITY, alpha=0.01,
                     self_validating_filter=svf, up_t=up_t, **kw)

    hit_plain = g.add("CLIPTextEncode", clip=c[1], text=HIT_PROMPT)
    far_plain = g.add("CLIPTextEncode", clip=c[1], text=FAR_PROMPT)
    f_hit, f_svf, f_far = filt(HIT_PROMPT), filt(HIT_PROMPT, svf=True, up_t=2), filt(FAR_PROMPT)
    ine = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=c[1], embedding_name=emb, text="{}",
                strength=1.0)
    f_ine = filt(HIT_PROMPT, embedding=ine[1])
    re_off = g.add("SafeGen_SAFREEReattention", model=c[0], b1=1.0, b2=1.0, s1=0.9, s2=0.2, start_percent=0.0,
                   end_percent=1.0)  # mode omitted: an old workflow → off
    re = g.add("SafeGen_SAFREEReattention", model=c[0], b1=1.0, b2=1.0, s1=0.9, s2=0.2, start_percent=0.0,
               end_percent=1.0, mode="safeguard-low", original=f_hit[2])
    out = {"hit_plain": ksampler(g, c[0], hit_plain[0], neg[0], lat[0], "hit_plain"),
           "hit": ksampler(g, c[0], f_hit[0], neg[0], lat[0], "hit"),
           "hit_svf": ksampler(g, c[0], f_svf[0], neg[0], lat[0], "hit_svf"),
           "hit_ine": ksampler(g, c[0], f_ine[0], neg[0], lat[0], "hit_ine"),
           "hit_re_off": ksampler(g, re_off[0], f_hit[0], neg[0], lat[0], "hit_re_off"),
           "hit_re": ksampler(g, re[0], f_hit[0], neg[0], lat[0], "hit_re"),
           "far_plain": ksampler(g, c[0], far_plain[0], neg[0], lat[0], "far_plain"),
           "far": ksampler(g, c[0], f_far[0], neg[0], lat[0], "far")}
    r = comfy_server.run(g, timeout=900)
    L = {k: latent(comfy_server, r, v) for k, v in out.items()}
    rep_hit, rep_svf, rep_far = (report_text(r, n) for n in (f_hit, f_svf, f_far))
    rep_ine = report_text(r, f_ine)
    assert "tokens flagged:" in rep_hit and not rep_hit.startswith("clip_l chunk 0: 0/"), rep_hit
    # (c) the filter changes the output for a prompt with flagged tokens...
    ref = L["hit_plain"]
    assert dist(L["hit"], ref) > 1e-3 * float(ref.norm())
    # ...the self-validating window keeps it for the first steps only: a third result
    assert "original after" in rep_svf, rep_svf
    assert not torch.equal(L["hit_svf"], L["hit"]) and not torch.equal(L["hit_svf"], ref)
    # an implicit negative embedding joins the subspace (flags/result may change; it must run)
    assert "tokens flagged" in rep_ine and torch.isfinite(L["hit_ine"]).all()
    # re-attention off (the default) is the filter-only run, bit for bit; safeguard-low runs with the
    # original prompt batched in (on the tiny UNet, whose decoder has only 320-channel stages, the
    # 4x/2x-channel stages do not exist, so the result is the same up to batching round-off; the
    # filter itself is tested in-process)
    assert torch.equal(L["hit_re_off"], L["hit"])
    torch.testing.assert_close(L["hit_re"], L["hit"], rtol=1e-4, atol=1e-4 * float(L["hit"].abs().max()))
    # a prompt with no flagged token is left exactly as CLIPTextEncode makes it
    assert "0/2 tokens flagged" in rep_far and "unchanged" in rep_far, rep_far
    assert torch.equal(L["far"], L["far_plain"])


@pytest.mark.sdxl
def test_sdxl_sld_and_safree(comfy_server):
    ck = install(comfy_server, "sdxl")
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    pos = g.add("CLIPTextEncode", clip=c[1], text="a nude woman")
    neg = g.add("CLIPTextEncode", clip=c[1], text="")
    saf = g.add("CLIPTextEncode", clip=c[1], text="nudity")
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    f = g.add("SafeGen_SAFREEPromptFilter", clip=c[1], text="a nude woman",
              toxic_concepts="Nudity\nSexual Acts", alpha=0.01, self_validating_filter=True, up_t=10)
    out = {"plain": ksampler(g, c[0], pos[0], neg[0], lat[0], "xl_plain", steps=3),
           "gs0": ksampler(g, sld(g, c[0], saf[0], 0.0)[0], pos[0], neg[0], lat[0], "xl_gs0", steps=3),
           "s5": ksampler(g, sld(g, c[0], saf[0], 5.0)[0], pos[0], neg[0], lat[0], "xl_s5", steps=3),
           "s50": ksampler(g, sld(g, c[0], saf[0], 50.0)[0], pos[0], neg[0], lat[0], "xl_s50", steps=3),
           "safree": ksampler(g, c[0], f[0], neg[0], lat[0], "xl_safree", steps=3)}
    r = comfy_server.run(g, timeout=1800)
    L = {k: latent(comfy_server, r, v) for k, v in out.items()}
    plain = L["plain"]
    assert torch.equal(L["gs0"], plain)
    d5, d50 = dist(L["s5"], plain), dist(L["s50"], plain)
    assert 1e-3 * float(plain.norm()) < d5 < d50, (d5, d50)
    rep = report_text(r, f)
    # SDXL as the reference: CLIP-G only, every step (no self-validating filter in its pipeline)
    assert "clip_g chunk 0" in rep and "clip_l chunk" not in rep and "CLIP-G columns" in rep, rep
    assert "not part of SAFREE's SDXL pipeline" in rep or "unchanged" in rep, rep
    flagged = sum(int(line.split(": ")[1].split("/")[0]) for line in rep.splitlines()
                  if "tokens flagged" in line)
    if flagged:
        assert dist(L["safree"], plain) > 1e-4 * float(plain.norm()), rep
    else:
        assert torch.equal(L["safree"], plain), rep
