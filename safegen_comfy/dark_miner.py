"""Dark Miner (mine → verify → circumvent) on a ComfyUI MODEL; the loop and its scores are
``safegen_core.darkminer``'s. One training session serves every round: mining trains token vectors
through the current (erased) weights, circumventing trains the UNet deltas; the model is hashed
once per run."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil

import torch

import comfy.sample

from ..safegen_core import darkminer as dm_core
from ..safegen_core import esd as esd_core
from ..safegen_core.weights_io import content_hash, sanitize_name, weights_fingerprint
from . import common, compat, esd, text, training
from .inversion import init_token_vectors, invert, model_fingerprint

log = logging.getLogger("safegen")

VARIANTS = esd.VARIANTS
XT_SAMPLERS = esd.XT_SAMPLERS


def resolve_anchors(prompts: str) -> list[str]:
    return dm_core.parse_anchor_prompts(prompts) or dm_core.default_anchor_prompts()


def generate_concept_latents(model, clip, concept: str, n: int, resolution: int, steps: int, cfg: float,
                             seed: int) -> torch.Tensor:
    """n images of the concept from the ORIGINAL model (ComfyUI's sampler, euler/normal), model space."""
    ch, h, w = esd.latent_size(model, resolution)
    pos, neg = text.encode(clip, concept), text.encode(clip, "")
    lat = comfy.sample.fix_empty_latent_channels(model, torch.zeros([n, ch, h, w]))
    noise = comfy.sample.prepare_noise(lat, seed)
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, lat, seed=seed,
                              disable_pbar=True)
    lat = compat.process_latent_in(model, out)
    with torch.inference_mode(False):
        return lat.detach().float().cpu().clone()


def dark_miner(model, clip, concept, anchors, *, variant="x", rounds=4, mining_steps=100, mining_lr=1e-2,
               circumvent_steps=100, learning_rate=5e-5, eta=1.0, anchor_weight=1.0, sampling_steps=50,
               start_guidance=3.0, resolution=512, concept_images=8, latents=None, verify_draws=16,
               verify_margin=0.0, seed=0, xt_sampler="erased", checkpoint_every=0, keep_checkpoints=2,
               preview_every=0, resume=False, name="dark_miner", vae=None):
    """Run Dark Miner; returns dict(records, pool, reason, targets, patches, keys, fingerprint, losses,
    last_mined, latents, anchors)."""
    concept, variant, _ = esd.check_settings(concept, "Dark Miner Eraser", variant, xt_sampler)
    if rounds < 1:
        raise ValueError(f"Dark Miner Eraser: rounds must be ≥ 1, got {rounds}")
    anchors = [a for a in (anchors or []) if a.strip()]
    ch, h, w = esd.latent_size(model, resolution)
    if latents is None:
        latents = generate_concept_latents(model, clip, concept, concept_images, resolution, sampling_steps,
                                           start_guidance, seed)
    mine_lat, verify_lat = dm_core.split_latents(latents)
    h, w = int(latents.shape[-2]), int(latents.shape[-1])
    fingerprint = {
        "method": "dark_miner", "model": None, "concept": concept,
        "anchors": content_hash("\n".join(anchors)), "variant": variant,
        "eta": eta, "anchor_weight": anchor_weight, "sampling_steps": sampling_steps,
        "start_guidance": start_guidance, "latents": weights_fingerprint({"x": latents}),
        "xt_sampler": xt_sampler, "mining_steps": mining_steps, "mining_lr": mining_lr,
        "circumvent_steps": circumvent_steps, "lr": learning_rate, "seed": seed, "verify_draws": verify_draws,
        "verify_margin": verify_margin}
    state_dir = common.checkpoint_dir("dark_miner", name)
    save_states = checkpoint_every > 0
    last = {}
    with esd.erasure_session(model, clip, variant, w, h) as er:
        fingerprint["model"] = model_fingerprint(er.model)  # once per run
        null = esd.text_cond(er.clip, "")
        c_concept = esd.text_cond(er.clip, concept)
        anchor_conds = [esd.text_cond(er.clip, a) for a in anchors]
        # the empty prompt is always preserved too: CFG uses its prediction at every step of every image
        keep_conds = anchor_conds + ([null] if "" not in anchors else [])
        train_sigmas = common.model_sigmas(model)
        sigmas = esd_core.ddim_sigmas(train_sigmas, sampling_steps)
        init = init_token_vectors(clip, concept)
        n_vec = min(16, max(v.shape[0] for v in init.values()))
        emb_text = text.prompt_with_embedding("{}")
        cond_cache: dict[int, tuple] = {}

        def cond_of(m: dm_core.Mined):
            if id(m) not in cond_cache:
                cond_cache[id(m)] = esd.text_cond(er.clip, emb_text, m.vectors)
            return cond_cache[id(m)]

        def mine(r):
            log.info("Dark Miner round %d/%d: mining", r, rounds)
            res, _ = invert(model, clip, mine_lat, name=f"{name}_round{r}", num_vectors=n_vec, template="{}",
                            steps=mining_steps, learning_rate=mining_lr, batch_size=min(4, mine_lat.shape[0]),
                            seed=seed * 1000 + r, objective="ldm", checkpoint_every=0, resume=False,
                            init_vectors={k: v[:n_vec] for k, v in init.items()}, sess=er.session,
                            model_hash=fingerprint["model"])
            win = max(1, len(res.losses) // 10)
            m = dm_core.Mined({k: v.detach().float().cpu() for k, v in res.params.items()},
                              sum(res.losses[-win:]) / win if res.losses else float("nan"))
            last["mined"] = m
            return m

        def verify_fn(m):
            er.hooks.check()
            return dm_core.verify(er.eps, verify_lat, train_sigmas, cond_of(m), null, anchor_conds,
                                  draws=verify_draws, batch=4, seed=seed + 17, margin=verify_margin, erased=True)

        def circumvent(r, pool):
            log.info("Dark Miner round %d/%d: circumventing %d embedding(s)", r, rounds, len(pool))
            er.hooks.check()
            targets = [c_concept] + [cond_of(m) for m in pool]
            loss_fn = dm_core.make_circumvent_loss_fn(er.eps, targets, keep_conds, null, sigmas, [1, ch, h, w],
                                                      eta=eta, anchor_weight=anchor_weight,
                                                      start_guidance=start_guidance, xt_sampler=xt_sampler)
            fp = dict(fingerprint, round=r, deltas=weights_fingerprint(er.deltas),
                      pool=[content_hash(m.vectors) for m in pool])
            ckpt = os.path.join(state_dir, f"round_{r:03d}") if (checkpoint_every or resume) else None
            result = training.run(er.deltas, loss_fn, steps=circumvent_steps, lr=learning_rate,
                                  seed=seed * 1000 + r, optimizer="adam", label=f"round {r}/{rounds} loss",
                                  checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                                  preview_every=preview_every,
                                  on_preview=esd.preview_fn(er, vae, concept, seed, resolution),
                                  ckpt_dir=ckpt, resume=resume, fingerprint=fp)
            return result.losses

        records, pool, start = [], [], 1
        if save_states and not resume:  # states of an earlier run would be rotated/resumed wrongly
            for _, old in dm_core.state_files(state_dir):
                with contextlib.suppress(OSError):
                    os.remove(old)
        if resume:
            st = dm_core.load_round_state(state_dir, fingerprint, er.deltas)
            if st is not None:
                records, pool, start = st
                log.info("Dark Miner: resumed after round %d", start - 1)

        def on_round_done(recs, pool_now):
            if save_states:
                dm_core.save_round_state(state_dir, recs, pool_now, er.deltas, fingerprint, keep_checkpoints)
                shutil.rmtree(os.path.join(state_dir, f"round_{recs[-1].round:03d}"), ignore_errors=True)

        records, pool, reason = dm_core.run_rounds(rounds, mine, verify_fn, circumvent, pool=pool, records=records,
                                                   start_round=start, on_round_done=on_round_done)
        targets, patches = esd_core.replacement_and_patch(er.base_weights(), er.deltas)
        keys = list(er.keys)
    last_mined = last.get("mined") or (pool[-1] if pool else dm_core.Mined(
        {k: v[:n_vec] for k, v in init.items()}, float("nan")))
    losses = [v for rec in records for v in rec.circumvent_losses]
    return {"records": records, "pool": pool, "reason": reason, "targets": targets, "patches": patches,
            "keys": keys, "fingerprint": fingerprint, "losses": losses, "last_mined": last_mined,
            "latents": latents, "anchors": anchors}


def run_dark_miner(model, clip, concept, anchor_prompts, *, name, images=None, vae=None, **settings):
    """The Dark Miner Eraser: (erased MODEL, last mined EMBEDDING, loss plot, info); saves the partial file."""
    name = sanitize_name(name, "dark_miner")
    latents = None
    if images is not None:
        if vae is None:
            raise ValueError("Dark Miner Eraser: connect the VAE to use concept images")
        latents = common.encode_images(model, vae, images)
    out = dark_miner(model, clip, concept, resolve_anchors(anchor_prompts), latents=latents, name=name, vae=vae,
                     **settings)
    fp, records = out["fingerprint"], out["records"]
    g = settings.get
    meta = esd.file_meta("Dark Miner", fp, {
        "concept": fp["concept"], "variant": f"esd-{fp['variant']}", "rounds_run": len(records),
        "rounds": g("rounds"), "stop_reason": out["reason"], "steps": g("circumvent_steps"),
        "mining_steps": g("mining_steps"), "eta": g("eta"), "lr": g("learning_rate"), "mining_lr": g("mining_lr"),
        "anchor_weight": g("anchor_weight"), "seed": g("seed"), "anchors": len(out["anchors"]),
        "optimizer": "adam", "sampling_steps": g("sampling_steps"), "start_guidance": g("start_guidance"),
        "resolution": g("resolution"), "xt_sampler": g("xt_sampler"),
        "verify": "gain = L(null) - L(c) on held-out concept latents; induces if "
                  f"(gain - max(0, benign gains)) / L(null) > {g('verify_margin')}",
        "records": [r.to_json() for r in records], "trained_tensors": len(out["keys"])})
    path = esd.save_unlearned(name, out["targets"], meta)
    m = esd.patched_model(model, out["patches"], os.path.basename(path))
    plot = common.loss_plot_image(out["losses"], f"Dark Miner loss: {fp['concept'][:40]}")
    emb = {"name": f"{name}_mined", "vectors": out["last_mined"].vectors,
           "metadata": {"safegen_kind": "dark_miner_mined_embedding", "concept": fp["concept"]}}
    info = (f"saved {path}\nDark Miner ESD-{fp['variant']} '{fp['concept']}': {len(out['keys'])} "
            f"tensors, {len(records)} round(s), {out['reason']}\n{dm_core.summary(records)}")
    return m, emb, plot, info
