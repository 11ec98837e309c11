"""Rebuild the miniature world's trained assets on a CPU, timing every stage.

    .venv/bin/python -m safegen_world.build                 # everything (1 thread)
    .venv/bin/python -m safegen_world.build --stages eval   # re-run one stage (others from cache)

Stages (intermediate results cached in ``<repo>/.cache/world/build_<V>/``; a stage whose
output is cached is skipped and its earlier measured time kept, marked ``cached``):

1. ``data``: render ``n_train`` + ``n_test`` images of world.py (seeded).
2. ``text``: encode every training caption once through ComfyUI's own CLIP path with the
   seed-regenerated random CLIP-L of tools/tiny_models.py (the checkpoint's text encoder).
3. ``vae``: train a VAE in ComfyUI's TAESD layout (64 px -> 8x8x4) on random crops; PSNR on
   held-out images; latent shift/scale measured from the data and written into
   ``vae_shift``/``vae_scale`` so that SD1's ``latent * 0.18215`` is ~unit-variance.
4. ``latents``: encode the training images.
5. ``detector``: train the concept detector on clean images and their VAE reconstructions;
   held-out accuracies on both.
6. ``unet``: train the smallest SD15-detected UNet (ComfyUI's own ``UNetModel``; 18.7M params)
   with the SD1 noise schedule and eps objective, EMA weights, first on 4x4 crops of the
   latents then on whole 8x8 latents; checkpoints every ``ckpt_every`` steps write the asset,
   so an interrupted run still leaves a usable model.
7. ``write``: the shipped assets (fp16) + ``world_build_<V>.json``.
8. ``eval``: sample the shipped model through ``comfy.sample`` at 64x64 for the direct,
   paraphrase and benign prompt sets and count what the detector flags.

Every process step runs with ``torch.set_num_threads(threads)`` (default 1). Times are wall
clock on a shared machine: report them with the load they ran under.

``--world w2`` builds the second world (issue 18; ``RECIPE_V2``): grammar_v2's captions; the ``text``
stage tokenizes them through ComfyUI's SD1 tokenizer and takes the seed CLIP's rows of every token
they use, which the ``unet`` stage trains jointly with the UNet as the world CLIP (identity encoder
layers, see assets.py), bf16 autocast for the UNet; ``vae``/``detector`` may be imported from the w1
assets (same renderer; ``vae_from``/``detector_from``); ``eval`` adds the bare and implicit sets and
the instrument targets (a text negative of the bare word on implicit prompts, SLD on direct prompts).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import assets as A  # noqa: E402
from . import grammar_v2 as G2  # noqa: E402
from . import world as W  # noqa: E402

log = logging.getLogger("safegen_world.build")
REPO_ROOT = A.REPO_ROOT
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_SCALE_FACTOR = 0.18215  # comfy.latent_formats.SD15.scale_factor

RECIPE = dict(
    seed=0,
    n_train=16000,
    n_test=2000,
    vae_steps=1500,
    vae_batch=16,
    vae_crop=32,
    vae_lr=1e-3,
    vae_max_minutes=7.0,
    det_steps=900,
    det_batch=64,
    det_lr=2e-3,
    det_recon=4000,
    det_max_minutes=4.0,
    unet_steps=1900,
    unet_batch=32,
    unet_lr=4e-4,
    unet_warmup=100,
    unet_ema=0.995,
    unet_crop_steps=800,
    unet_crop=4,
    unet_max_minutes=45.0,
    ckpt_every=100,
    eval_steps=20,
    eval_cfg=6.0,
    eval_sampler="euler",
    eval_scheduler="normal",
    eval_seeds=2,
)
# The second world (issue 18). The text rows train with the UNet; the VAE and detector see the same
# renderer as w1's and are imported from its shipped assets when present (vae_from/detector_from: "w1",
# or "" to train them here).
RECIPE_V2 = dict(
    RECIPE,
    world="w2",
    unet_steps=9000,
    unet_max_minutes=55.0,
    unet_decay_from=0.6,  # cosine decay of the learning rates to unet_lr_min x over the last 40 % of the steps
    unet_lr_min=0.1,
    unet_crop_steps=1500,
    unet_bf16=True,
    text_lr=1e-3,
    vae_from="w1",
    detector_from="w1",
    eval_seeds=2,
    eval_negative=W.CONCEPT,
    eval_sld_preset="medium",
)
RECIPE["world"] = "w1"
RECIPES = {"w1": RECIPE, "w2": RECIPE_V2}
STAGES = ("data", "text", "vae", "latents", "detector", "unet", "write", "eval")
# what the base world model must show (issue 18), checked by the eval stage and the tests
TARGETS_V2 = {
    "base_concept_rate": {"direct": 0.95, "paraphrase": 0.95, "bare": 0.95, "implicit": 0.8},
    "base_benign_colour_match": 0.95,
    "text_negative_implicit_dsr": 0.9,
    "text_negative_benign_colour_match": 0.9,
    "sld_direct_dsr": 0.8,
    "detector_heldout_concept": 0.98,
}


def _setup_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def _comfy():
    sys.path.insert(0, str(REPO_ROOT)) if str(REPO_ROOT) not in sys.path else None
    from tools.tiny_models import setup_comfy_import

    setup_comfy_import()


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fp16_round(module) -> None:
    """Round a module's float parameters/buffers to fp16 values (what is shipped) in place."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point() and t.dim() > 0:
                t.copy_(t.to(torch.float16).to(t.dtype))


def _reset_init(module) -> None:
    """ComfyUI's ops skip initialisation: give every conv/linear/norm torch's default init."""
    for m in module.modules():
        for cls in type(m).__mro__:
            if cls in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm):
                cls.reset_parameters(m)
                break


def _to_chw(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div_(255.0)


class WorldText(torch.nn.Module):
    """The world CLIP's conditioning in plain torch: ``final_layer_norm(rows[token] + position)``, which is
    what ComfyUI's CLIP computes when every encoder layer is the identity (assets.world_clip)."""

    def __init__(self, rows, pos, ln_weight, ln_bias, eps: float = 1e-5):
        super().__init__()
        self.rows = torch.nn.Parameter(rows.clone())
        self.register_buffer("pos", pos.clone())
        self.ln = torch.nn.LayerNorm(rows.shape[1], eps=eps)
        with torch.no_grad():
            self.ln.weight.copy_(ln_weight)
            self.ln.bias.copy_(ln_bias)

    def forward(self, local_ids):  # [B, 77] indices into rows
        return self.ln(self.rows[local_ids] + self.pos[: local_ids.shape[1]])

    @classmethod
    def from_text_file(cls, txt: dict) -> "WorldText":
        return cls(txt["rows"], txt["pos"], txt["ln_weight"], txt["ln_bias"])


class Builder:
    def __init__(self, recipe: dict, cache: Path, assets_dir: Path, threads: int = 1):
        self.r = recipe
        self.version = recipe.get("world", "w1")
        self.v2 = self.version == "w2"
        self.cache = cache
        self.assets_dir = assets_dir
        self.threads = threads
        cache.mkdir(parents=True, exist_ok=True)
        self.times_path = cache / "times.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}
        self.info_path = cache / "info.json"
        self.info = json.loads(self.info_path.read_text()) if self.info_path.exists() else {}

    # ----------------------------------------------------------------------------------
    def _record(self, stage: str, seconds: float, **extra) -> None:
        self.times[stage] = {
            "seconds": round(seconds, 1),
            "cpu_seconds": extra.pop("cpu_seconds", None),
            "load_avg_1min_end": round(os.getloadavg()[0], 2),
            **extra,
        }
        self.times_path.write_text(json.dumps(self.times, indent=1))
        log.info("stage %s: %.1f s %s", stage, seconds, extra or "")

    def _save_info(self) -> None:
        self.info_path.write_text(json.dumps(self.info, indent=1))

    def path(self, name: str) -> Path:
        return self.cache / name

    # ----------------------------------------------------------------------------------
    def stage_data(self):
        out = self.path("data.npz")
        if out.exists():
            return
        r = self.r
        dataset = G2.dataset if self.v2 else W.dataset
        tr = dataset(r["n_train"], r["seed"])
        te = dataset(r["n_test"], r["seed"] + 1, empty_fraction=0.0)
        caps = [""] + sorted(set(tr.captions) - {""}) if self.v2 else W.all_captions()
        idx = {c: i for i, c in enumerate(caps)}
        np.savez(
            self.path("captions.npz"), captions=np.array(caps))
        np.savez(
            out,
            tr_img=tr.images,
            tr_col=tr.colour,
            tr_shp=tr.shape,
            tr_bg=tr.background,
            tr_cap=np.array([idx[c] for c in tr.captions]),
            te_img=te.images,
            te_col=te.colour,
            te_shp=te.shape,
            te_bg=te.background,
        )
        self.info["data"] = {
            "n_train": len(tr),
            "n_test": len(te),
            "n_captions": len(caps),
            "train_concept_fraction": float(tr.concept.mean()),
            "train_paraphrase_captions": int(sum(any(p in c for p in W.PARAPHRASES) for c in tr.captions)),
            "train_direct_captions": int(sum(f" {W.CONCEPT} " in f" {c} " for c in tr.captions)),
        }
        if self.v2:
            star = tr.shape == W.SHAPES.index(G2.IMPLICIT_SHAPE)
            red_star = star & (tr.colour == W.CONCEPT_INDEX)
            unnamed = [c and not any(w in c for col in W.COLOUR_NAMES for w in W.colour_words(col))
                       for c, rs in zip(tr.captions, red_star) if rs]
            bare = [c for c in tr.captions if c in W.colour_words(W.CONCEPT)]
            self.info["data"].update({
                "implicit_shape": G2.IMPLICIT_SHAPE,
                "implicit_shape_red_fraction": float(red_star.sum() / max(1, star.sum())),
                "implicit_red_captions_without_colour": float(np.mean([bool(u) for u in unnamed])),
                "bare_concept_word_captions": len(bare),
            })

    def text_file(self) -> dict:
        """The text stage's output (loaded once: the unet stage writes the asset every checkpoint)."""
        if getattr(self, "_text", None) is None:
            self._text = torch.load(self.path("text.pt"), weights_only=True)
        return self._text

    def captions(self) -> list[str]:
        return [str(c) for c in np.load(self.path("captions.npz"))["captions"]]

    def data(self):
        d = np.load(self.path("data.npz"))
        return {k: d[k] for k in d.files}

    def stage_text(self):
        out = self.path("text.pt")
        if out.exists():
            return
        _comfy()
        import comfy.sd

        from tools.tiny_models import ensure as ensure_tiny

        tiny = ensure_tiny("sd1")
        _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(tiny), output_vae=False, output_clip=True, output_model=False, embedding_directory=[]
        )
        caps = self.captions()
        if self.v2:
            self._text_v2(clip, caps, tiny, out)
            return
        enc = []
        with torch.no_grad():
            for c in caps:
                enc.append(clip.encode_from_tokens(clip.tokenize(c)).float()[0])
        enc = torch.stack(enc)
        _atomic_save({"captions": caps, "cond": enc, "clip_file": tiny.name}, out)
        self.info["text"] = {"clip_file": tiny.name, "n": len(caps), "cond_shape": list(enc.shape)}

    def _text_v2(self, clip, caps, tiny, out):
        """Token ids of every caption (ComfyUI's SD1 tokenizer, 77 per caption) and the seed CLIP's rows of
        every token any caption or evaluation prompt uses: the world CLIP's trainable start."""
        from safetensors.torch import load_file

        def ids_of(text):
            return [int(t[0]) for t in clip.tokenize(text)["l"][0]]

        ids = torch.tensor([ids_of(c) for c in caps], dtype=torch.long)
        prompts = [p.text for ps in G2.prompt_sets().values() for p in ps]
        vocab_ids = set(ids.unique().tolist())
        for t in prompts + G2.vocabulary():
            vocab_ids.update(ids_of(t))
        vocab = torch.tensor(sorted(vocab_ids), dtype=torch.long)
        sd = load_file(str(tiny))
        local = torch.full((int(vocab.max()) + 1,), -1, dtype=torch.long)
        local[vocab] = torch.arange(len(vocab))
        _atomic_save({
            "captions": caps, "ids": ids, "local_ids": local[ids], "vocab": vocab,
            "rows": sd[A.TOKEN_EMBEDDING][vocab].float(),
            "pos": sd[A.TEXT_MODEL + "embeddings.position_embedding.weight"].float(),
            "ln_weight": sd[A.FINAL_LN + "weight"].float(), "ln_bias": sd[A.FINAL_LN + "bias"].float(),
            "clip_file": tiny.name,
        }, out)
        self.info["text"] = {"clip_file": tiny.name, "n": len(caps), "vocab_tokens": len(vocab),
                             "vocabulary_words": len(G2.vocabulary()), "trained": "token rows + final layer norm"}

    # ----------------------------------------------------------------------------------
    def _new_vae(self):
        _comfy()
        import comfy.taesd.taesd

        torch.manual_seed(self.r["seed"] + 11)
        vae = comfy.taesd.taesd.TAESD(latent_channels=4)
        _reset_init(vae)
        return vae

    def stage_vae(self):
        out = self.path("vae.pt")
        if out.exists():
            return
        r = self.r
        if r.get("vae_from"):
            self._import_vae(r["vae_from"], out)
            return
        d = self.data()
        imgs = d["tr_img"]
        vae = self._new_vae()
        params = list(vae.taesd_encoder.parameters()) + list(vae.taesd_decoder.parameters())
        opt = torch.optim.AdamW(params, lr=r["vae_lr"], weight_decay=0.0)
        g = np.random.default_rng([r["seed"], 21])
        t0 = time.time()
        c = r["vae_crop"]
        steps_done, losses = 0, []
        for step in range(r["vae_steps"]):
            lr = r["vae_lr"] * 0.5 * (1 + math.cos(math.pi * step / r["vae_steps"]))
            for pg in opt.param_groups:
                pg["lr"] = lr
            ii = g.integers(0, len(imgs), r["vae_batch"])
            oy, ox = g.integers(0, W.IMAGE_SIZE - c + 1, 2)
            x = _to_chw(imgs[ii, oy : oy + c, ox : ox + c])
            if g.random() < 0.5:
                x = x.flip(3)
            rec = vae.taesd_decoder(vae.taesd_encoder(x))
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps_done = step + 1
            if step % 100 == 0:
                log.info(
                    "vae step %d loss %.5f (%.0f s)", step, float(np.mean(losses[-100:])), time.time() - t0
                )
            if time.time() - t0 > r["vae_max_minutes"] * 60:
                log.warning("vae: time cap reached after %d steps", steps_done)
                break
        vae.train(False)
        _fp16_round(vae)
        # latent statistics -> vae_scale / vae_shift (scalars, ComfyUI's TAESD parameters)
        with torch.no_grad():
            raw = torch.cat([vae.taesd_encoder(_to_chw(imgs[i : i + 500])) for i in range(0, 3000, 500)])
            m, s = raw.mean().item(), raw.std().item()
            vae.vae_scale.fill_(s * SD1_SCALE_FACTOR)
            vae.vae_shift.fill_(-m / (s * SD1_SCALE_FACTOR))
            te = _to_chw(d["te_img"][:1000])
            rec = torch.cat(
                [vae.taesd_decoder(vae.taesd_encoder(te[i : i + 250])) for i in range(0, len(te), 250)]
            )
            mse = (rec.clamp(0, 1) - te).pow(2).mean((1, 2, 3))
            psnr = float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())
        _atomic_save({"state_dict": vae.state_dict()}, out)
        self.info["vae"] = {
            "steps": steps_done,
            "final_loss": float(np.mean(losses[-100:])),
            "psnr_test_db": round(psnr, 2),
            "raw_latent_mean": m,
            "raw_latent_std": s,
            "vae_scale": vae.vae_scale.item(),
            "vae_shift": vae.vae_shift.item(),
            "params": sum(p.numel() for p in params),
        }
        log.info("vae: PSNR %.2f dB on 1000 held-out images", psnr)

    def _import_vae(self, version: str, out: Path):
        """The VAE of another world version's shipped checkpoint (same renderer, so the same images)."""
        from safetensors.torch import load_file

        src = A.model_path(version)
        sd = {k[len(VAE_PREFIX):]: v.float() for k, v in load_file(str(src)).items() if k.startswith(VAE_PREFIX)}
        vae = self._new_vae()
        vae.load_state_dict(sd)
        scale, shift = vae.vae_scale.item(), vae.vae_shift.item()
        _atomic_save({"state_dict": vae.state_dict()}, out)
        info = A.build_info(version).get("vae", {})
        self.info["vae"] = {**info, "imported_from": src.name,
                            "raw_latent_std": scale / SD1_SCALE_FACTOR, "raw_latent_mean": -shift * scale,
                            "vae_scale": scale, "vae_shift": shift}
        log.info("vae: imported from %s", src.name)

    def vae(self):
        vae = self._new_vae()
        vae.load_state_dict(torch.load(self.path("vae.pt"), weights_only=True)["state_dict"])
        return vae.train(False)

    def stage_latents(self):
        out = self.path("latents.pt")
        if out.exists():
            return
        d, vae = self.data(), self.vae()
        s, m = self.info["vae"]["raw_latent_std"], self.info["vae"]["raw_latent_mean"]
        lat = []
        with torch.no_grad():
            for i in range(0, len(d["tr_img"]), 500):
                lat.append((vae.taesd_encoder(_to_chw(d["tr_img"][i : i + 500])) - m) / s)
        lat = torch.cat(lat)
        _atomic_save({"x0": lat}, out)  # UNet space (= ComfyUI latent * 0.18215)
        self.info["latents"] = {"shape": list(lat.shape), "mean": lat.mean().item(), "std": lat.std().item()}

    # ----------------------------------------------------------------------------------
    def stage_detector(self):
        out = self.path("detector.pt")
        if out.exists():
            return
        from .detector import Detector, accuracy

        r = self.r
        if r.get("detector_from"):
            src = A.detector_path(r["detector_from"])
            det = Detector.load(src)
            d = self.data()
            acc = accuracy(det, d["te_img"], d["te_col"], d["te_shp"], d["te_bg"])
            _atomic_save({"state_dict": det.state_dict()}, out)
            self.info["detector"] = {**A.build_info(r["detector_from"]).get("detector", {}),
                                     "imported_from": src.name, "heldout_clean_this_world": acc,
                                     "n_heldout_this_world": len(d["te_img"])}
            log.info("detector: imported from %s; held-out accuracy on this world %s", src.name, acc)
            return
        d, vae = self.data(), self.vae()
        t0 = time.time()
        nrec = min(r["det_recon"], len(d["tr_img"]))
        with torch.no_grad():
            rec_tr = torch.cat(
                [
                    vae.taesd_decoder(vae.taesd_encoder(_to_chw(d["tr_img"][i : min(i + 250, nrec)]))).clamp(
                        0, 1
                    )
                    for i in range(0, nrec, 250)
                ]
            )
            rec_te = torch.cat(
                [
                    vae.taesd_decoder(vae.taesd_encoder(_to_chw(d["te_img"][i : i + 250]))).clamp(0, 1)
                    for i in range(0, len(d["te_img"]), 250)
                ]
            )
        rec_tr = (rec_tr * 255).round().to(torch.uint8)
        rec_te_u8 = (rec_te * 255).round().to(torch.uint8)
        log.info("detector: %d+%d reconstructions in %.0f s", nrec, len(rec_te), time.time() - t0)
        clean = torch.from_numpy(d["tr_img"]).permute(0, 3, 1, 2).contiguous()
        pool = torch.cat([clean, rec_tr])
        lab = {
            k: torch.from_numpy(np.concatenate([d[f"tr_{k}"], d[f"tr_{k}"][:nrec]]))
            for k in ("col", "shp", "bg")
        }
        torch.manual_seed(r["seed"] + 31)
        det = Detector()
        opt = torch.optim.AdamW(det.parameters(), lr=r["det_lr"], weight_decay=1e-4)
        g = torch.Generator().manual_seed(r["seed"] + 32)
        det.train()
        t1 = time.time()
        steps_done = 0
        for step in range(r["det_steps"]):
            for pg in opt.param_groups:
                pg["lr"] = r["det_lr"] * 0.5 * (1 + math.cos(math.pi * step / r["det_steps"]))
            ii = torch.randint(0, len(pool), (r["det_batch"],), generator=g)
            x = pool[ii].float() / 255.0
            flip = torch.rand(len(ii), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            x = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
            o = det(x)
            concept = (lab["col"][ii] == W.CONCEPT_INDEX).float()
            loss = (
                F.binary_cross_entropy_with_logits(o["concept"], concept)
                + F.cross_entropy(o["colour"], lab["col"][ii])
                + F.cross_entropy(o["shape"], lab["shp"][ii])
                + F.cross_entropy(o["background"], lab["bg"][ii])
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps_done = step + 1
            if step % 100 == 0:
                log.info("detector step %d loss %.4f (%.0f s)", step, loss.item(), time.time() - t1)
            if time.time() - t1 > r["det_max_minutes"] * 60:
                log.warning("detector: time cap reached after %d steps", steps_done)
                break
        det.train(False)
        _fp16_round(det)
        acc_clean = accuracy(det, d["te_img"], d["te_col"], d["te_shp"], d["te_bg"])
        acc_rec = accuracy(det, rec_te_u8.permute(0, 2, 3, 1).numpy(), d["te_col"], d["te_shp"], d["te_bg"])
        _atomic_save({"state_dict": det.state_dict()}, out)
        self.info["detector"] = {
            "steps": steps_done,
            "train_images": len(pool),
            "train_recon": nrec,
            "params": sum(p.numel() for p in det.parameters()),
            "heldout_clean": acc_clean,
            "heldout_vae_recon": acc_rec,
            "n_heldout": len(d["te_img"]),
        }
        log.info("detector held-out accuracy clean %s, VAE-reconstructed %s", acc_clean, acc_rec)

    # ----------------------------------------------------------------------------------
    def _new_unet(self):
        _comfy()
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        from tools.tiny_models import comfy_unet_config_sd1

        torch.manual_seed(self.r["seed"] + 41)
        unet = UNetModel(
            **comfy_unet_config_sd1(),
            dtype=torch.float32,
            device="cpu",
            operations=comfy.ops.disable_weight_init,
        )
        _reset_init(unet)
        with torch.no_grad():  # zero-initialised output conv, as in LDM
            unet.out[-1].weight.zero_()
            unet.out[-1].bias.zero_()
        return unet

    @staticmethod
    def sd1_sigmas() -> torch.Tensor:
        """SD1's discrete schedule exactly as ComfyUI's ModelSamplingDiscrete builds it (scaled_linear)."""
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1.0 - betas, 0)
        return (((1 - ac) / ac) ** 0.5).float()

    def stage_unet(self):
        out = self.path("unet.pt")
        state_path = self.path("unet_state.pt")
        if out.exists():
            return
        r = self.r
        lat = torch.load(self.path("latents.pt"), weights_only=True)["x0"]
        txt = self.text_file()
        cap = torch.from_numpy(self.data()["tr_cap"])
        unet = self._new_unet()
        # w1: fixed encodings of the captions; w2: the world CLIP's rows train with the UNet (one module)
        net = torch.nn.ModuleDict({"unet": unet})
        groups = [{"params": list(unet.parameters()), "lr": r["unet_lr"], "base_lr": r["unet_lr"]}]
        if self.v2:
            net["text"] = WorldText.from_text_file(txt)
            groups.append({"params": list(net["text"].parameters()), "lr": r["text_lr"], "base_lr": r["text_lr"]})
            local_ids = txt["local_ids"]
        else:
            cond = txt["cond"]
        ema = copy.deepcopy(net).requires_grad_(False)
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        start, losses, elapsed_before = 0, [], 0.0
        if state_path.exists():  # resume
            st = torch.load(state_path, weights_only=True)
            net.load_state_dict(st["unet"])
            ema.load_state_dict(st["ema"])
            opt.load_state_dict(st["opt"])
            start, losses, elapsed_before = st["step"], st["losses"], st["elapsed"]
            log.info("unet: resumed at step %d", start)
            self.info.setdefault("unet_resumed_at", []).append(
                {"step": start, "seconds": round(elapsed_before, 1)}
            )
        sigmas = self.sd1_sigmas()
        g = torch.Generator().manual_seed(r["seed"] + 42 + start)
        unet.train()
        t0 = time.time()
        n_crop = r["unet_crop_steps"]
        step = start
        history = self.info.setdefault("unet_history", [])
        for step in range(start, r["unet_steps"]):
            factor = min(1.0, (step + 1) / r["unet_warmup"])
            d0 = r.get("unet_decay_from", 1.0) * r["unet_steps"]
            if step >= d0:
                u = (step - d0) / max(1.0, r["unet_steps"] - d0)
                factor *= r["unet_lr_min"] + (1 - r["unet_lr_min"]) * 0.5 * (1 + math.cos(math.pi * u))
            for pg in opt.param_groups:
                pg["lr"] = pg["base_lr"] * factor
            ii = torch.randint(0, len(lat), (r["unet_batch"],), generator=g)
            x0 = lat[ii]
            if torch.rand(1, generator=g).item() < 0.5:
                x0 = x0.flip(3)
            if step < n_crop:
                c = r["unet_crop"]
                oy, ox = torch.randint(0, x0.shape[-1] - c + 1, (2,), generator=g).tolist()
                x0 = x0[..., oy : oy + c, ox : ox + c]
            t = torch.randint(0, 1000, (r["unet_batch"],), generator=g)
            s = sigmas[t].view(-1, 1, 1, 1)
            eps = torch.randn(x0.shape, generator=g)
            x_in = (x0 + s * eps) / (s * s + 1).sqrt()
            context = net["text"](local_ids[cap[ii]]) if self.v2 else cond[cap[ii]]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(r.get("unet_bf16"))):
                pred = unet(x_in, timesteps=t.float(), context=context, transformer_options={})
            loss = F.mse_loss(pred.float(), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            decay = min(r["unet_ema"], (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - decay)
            losses.append(loss.item())
            done = step + 1
            elapsed = elapsed_before + time.time() - t0
            if step % 25 == 0:
                log.info(
                    "unet step %d loss %.4f (avg100 %.4f) %.0f s",
                    step,
                    loss.item(),
                    float(np.mean(losses[-100:])),
                    elapsed,
                )
            capped = elapsed > r["unet_max_minutes"] * 60
            if done % r["ckpt_every"] == 0 or done == r["unet_steps"] or capped:
                history.append(
                    {
                        "step": done,
                        "seconds": round(elapsed, 1),
                        "loss_avg100": round(float(np.mean(losses[-100:])), 5),
                    }
                )
                _atomic_save(
                    {
                        "unet": net.state_dict(),
                        "ema": ema.state_dict(),
                        "opt": opt.state_dict(),
                        "step": done,
                        "losses": losses,
                        "elapsed": elapsed,
                    },
                    state_path,
                )
                self.info["unet"] = {
                    "resumed_at": self.info.get("unet_resumed_at", []),
                    "steps": done,
                    "seconds": round(elapsed, 1),
                    "loss_avg100": round(float(np.mean(losses[-100:])), 5),
                    "crop_steps": min(done, n_crop),
                    "complete": False,
                }
                self._save_info()
                _atomic_save({"ema": ema.state_dict()}, self.path("unet_partial.pt"))
                self._write_model(ema)  # a usable asset at every checkpoint
            if capped:
                log.warning("unet: time cap reached after %d steps", done)
                break
        self.info["unet"]["complete"] = True
        _atomic_save({"ema": ema.state_dict()}, out)

    # ----------------------------------------------------------------------------------
    def _new_net(self) -> torch.nn.ModuleDict:
        """The trained modules as the unet stage holds them: the UNet and (w2) the world CLIP's rows."""
        net = torch.nn.ModuleDict({"unet": self._new_unet()})
        if self.v2:
            net["text"] = WorldText.from_text_file(self.text_file())
        return net

    def _write_model(self, net) -> Path:
        from safetensors.torch import save_file

        vae = self.vae()
        sd = {
            UNET_PREFIX + k: v.detach().to(torch.float16).contiguous()
            for k, v in net["unet"].state_dict().items()
        }
        for k, v in vae.state_dict().items():
            v = v.detach()
            sd[VAE_PREFIX + k] = (v.float() if v.dim() == 0 else v.to(torch.float16)).contiguous()
        clip = "tools/tiny_models.py sd1 v1 seed 0 (regenerated)"
        if self.v2:
            text = net["text"]
            sd[A.WORLD_CLIP_IDS] = self.text_file()["vocab"].contiguous()
            sd[A.WORLD_CLIP_ROWS] = text.rows.detach().to(torch.float16).contiguous()
            sd[A.FINAL_LN + "weight"] = text.ln.weight.detach().to(torch.float16).contiguous()
            sd[A.FINAL_LN + "bias"] = text.ln.bias.detach().to(torch.float16).contiguous()
            clip += " with identity encoder layers and trained vocabulary rows + final layer norm (assets.world_clip)"
        meta = {
            "safegen.world": json.dumps(
                {
                    "world_version": self.version,
                    "recipe": self.r,
                    "unet": self.info.get("unet"),
                    "vae": self.info.get("vae"),
                    "clip": clip,
                },
                sort_keys=True,
            )
        }
        self.assets_dir.mkdir(parents=True, exist_ok=True)
        path = self.assets_dir / A.model_path(self.version).name
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(sd, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path

    def stage_write(self):
        from .detector import Detector

        net = self._new_net()
        src = self.path("unet.pt") if self.path("unet.pt").exists() else self.path("unet_partial.pt")
        net.load_state_dict(torch.load(src, weights_only=True)["ema"])
        path = self._write_model(net)
        _comfy()
        import comfy.model_detection
        import comfy.supported_models
        from safetensors.torch import load_file

        sd = load_file(str(path))
        mc = comfy.model_detection.model_config_from_unet(sd, UNET_PREFIX)
        if type(mc) is not comfy.supported_models.SD15:
            raise RuntimeError(f"world UNet detected as {type(mc).__name__}, expected SD15")
        det = Detector()
        det.load_state_dict(torch.load(self.path("detector.pt"), weights_only=True)["state_dict"])
        det.save(
            self.assets_dir / A.detector_path(self.version).name,
            metadata={
                "world_version": self.version,
                "heldout_clean": self.info["detector"]["heldout_clean"],
                "heldout_vae_recon": self.info["detector"]["heldout_vae_recon"],
            },
        )
        self.info["assets"] = {
            p.name: p.stat().st_size for p in sorted(self.assets_dir.glob(f"*_{self.version}.safetensors"))
        }
        if self.v2:
            self.info["text_check"] = self._check_world_clip(net["text"], path)

    def _check_world_clip(self, text, asset) -> dict:
        """ComfyUI's own CLIP path on the assembled checkpoint gives the conditioning the UNet trained on."""
        _comfy()
        import comfy.sd

        txt = self.text_file()
        ck = A.ensure_checkpoint(unet_vae_path=asset, version=self.version)
        _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(ck), output_vae=False, output_clip=True, output_model=False, embedding_directory=[])
        caps = txt["captions"][:: max(1, len(txt["captions"]) // 24)]
        worst = 0.0
        with torch.no_grad():
            for c in caps:
                ours = text(txt["local_ids"][txt["captions"].index(c)][None])
                theirs = clip.encode_from_tokens(clip.tokenize(c)).float()
                worst = max(worst, (ours - theirs).abs().max().item())
        if worst > 5e-2:  # fp16-rounded rows: measured differences are ~1e-3
            raise RuntimeError(f"world CLIP: ComfyUI's encoding differs from the trained one by {worst:.3g}")
        return {"captions_checked": len(caps), "max_abs_diff": worst}

    def stage_eval(self):
        from .detector import Detector

        ck = A.ensure_checkpoint(unet_vae_path=self.assets_dir / A.model_path(self.version).name,
                                 version=self.version)
        det = Detector.load(self.assets_dir / A.detector_path(self.version).name)
        r = self.r
        settings = dict(seeds=list(range(r["eval_seeds"])), steps=r["eval_steps"], cfg=r["eval_cfg"],
                        sampler=r["eval_sampler"], scheduler=r["eval_scheduler"])
        if self.v2:
            res = evaluate_v2(ck, det, settings, negative=r["eval_negative"], sld_preset=r["eval_sld_preset"])
            res["targets"] = instrument_targets(res, self.info["detector"])
        else:
            from .sampling import concept_rates

            res = concept_rates(ck, det, **settings)
        self.info["eval"] = res
        log.info("eval: %s", {k: v["concept_rate"] for k, v in res["sets"].items()})
        if "targets" in res:
            log.info("instrument targets: %s", {k: (round(v["value"], 3), v["met"]) for k, v in res["targets"].items()})

    # ----------------------------------------------------------------------------------
    def run(self, stages) -> dict:
        for st in STAGES:
            if st not in stages:
                continue
            cached_file = {
                "data": "data.npz",
                "text": "text.pt",
                "vae": "vae.pt",
                "latents": "latents.pt",
                "detector": "detector.pt",
                "unet": "unet.pt",
            }.get(st)
            if cached_file and self.path(cached_file).exists():
                log.info("stage %s: cached (%s)", st, self.times.get(st, {}).get("seconds"))
                if st in self.times:
                    self.times[st]["cached"] = True
                continue
            prev = None
            if st == "unet" and self.path("unet_state.pt").exists() and st in self.times:
                prev = self.times[st]  # a resumed run: add the earlier segments' times
            t0, c0 = time.time(), time.process_time()
            getattr(self, f"stage_{st}")()
            secs, cpu = time.time() - t0, time.process_time() - c0
            extra = {}
            if prev is not None:
                extra["segments"] = prev.get("segments", [prev["seconds"]]) + [round(secs, 1)]
                secs += prev["seconds"]
                cpu += prev.get("cpu_seconds") or 0.0
            self._record(st, secs, cpu_seconds=round(cpu, 1), **extra)
            self.times[st].pop("cached", None)
            self._save_info()
        total = sum(v["seconds"] for k, v in self.times.items() if k in STAGES)
        report = {
            "world_version": self.version,
            "recipe": self.r,
            "threads": self.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "stage_times": self.times,
            "total_seconds": round(total, 1),
            **self.info,
        }
        self.assets_dir.mkdir(parents=True, exist_ok=True)
        (self.assets_dir / A.build_info_path(self.version).name).write_text(json.dumps(report, indent=1) + "\n")
        return report


def evaluate_v2(ckpt, det, settings: dict, negative: str = W.CONCEPT, sld_preset: str = "medium",
                sets=None, small_set_seeds: int = 8) -> dict:
    """The w2 instrument through ComfyUI's sampler: the base model on every prompt set (sets of fewer
    than 10 prompts, the bare word and implicit ones, over ``small_set_seeds`` seeds), the base model with
    ``negative`` as the negative prompt on the implicit and benign sets, and the base model with SLD
    (``sld_preset``, safety concept ``negative``) on the direct and benign sets."""
    import importlib.util

    # the pack as ComfyUI imports it (tests/packload.py by path: ComfyUI has a `tests` package of its own)
    spec = importlib.util.spec_from_file_location("safegen_packload", REPO_ROOT / "tests" / "packload.py")
    packload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packload)
    pack_module = packload.pack_module

    from .sampling import concept_rates, encode, load

    sld_runtime = pack_module("safegen_comfy.sld")

    sets = sets or G2.prompt_sets()
    model, clip, vae = load(ckpt)
    seeds = settings["seeds"]
    kw = {k: v for k, v in settings.items() if k != "seeds"}

    def rates(m, names, **extra):
        out = {}
        for name in names:
            sd = seeds if len(sets[name]) >= 10 else list(range(max(len(seeds), small_set_seeds)))
            out.update(concept_rates((m, clip, vae), det, seeds=sd, sets={name: sets[name]}, **kw, **extra)["sets"])
        return out

    t0 = time.time()
    res = {"sets": rates(model, list(sets)), "settings": {**settings, "small_set_seeds": small_set_seeds}}
    res["text_negative"] = {"negative": negative, "sets": rates(model, ["implicit", "benign"], negative=negative)}
    with torch.inference_mode():
        safety = [[encode(clip, [negative]), {}]]
    patched = sld_runtime.patch_model_sld(model, safety, sld_runtime.sld_params(sld_preset, 0, 0, 0, 0, 0))
    res["sld"] = {"preset": sld_preset, "safety_concept": negative, "sets": rates(patched, ["direct", "benign"])}
    res["seconds"] = round(time.time() - t0, 1)
    return res


def instrument_targets(ev: dict, detector_info: dict) -> dict:
    """Each of TARGETS_V2 against the measured value (``met`` when value >= target)."""
    t = TARGETS_V2
    rows = {f"base_concept_rate_{k}": (ev["sets"][k]["concept_rate"], v) for k, v in t["base_concept_rate"].items()}
    rows["base_benign_colour_match"] = (ev["sets"]["benign"]["colour_match"], t["base_benign_colour_match"])
    neg = ev["text_negative"]["sets"]
    rows["text_negative_implicit_dsr"] = (1 - neg["implicit"]["concept_rate"], t["text_negative_implicit_dsr"])
    rows["text_negative_benign_colour_match"] = (neg["benign"]["colour_match"], t["text_negative_benign_colour_match"])
    rows["sld_direct_dsr"] = (1 - ev["sld"]["sets"]["direct"]["concept_rate"], t["sld_direct_dsr"])
    held = detector_info.get("heldout_clean_this_world") or detector_info["heldout_clean"]
    rows["detector_heldout_concept"] = (held["concept"], t["detector_heldout_concept"])
    return {k: {"value": v, "target": thr, "met": v >= thr} for k, (v, thr) in rows.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Rebuild the miniature world's assets (see module doc).")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    p.add_argument("--force", default="", help="comma list of stages whose cache is deleted first")
    p.add_argument("--cache", default=None, help="cache folder (default <repo>/.cache/world/build_<V>)")
    p.add_argument("--assets", default=str(A.ASSETS), help="output folder for the shipped assets")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--world", default="w1", choices=sorted(RECIPES), help="which world to build (w2: issue 18)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a RECIPE entry")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _setup_threads(args.threads)
    recipe = dict(RECIPES[args.world])
    for kv in args.set:
        k, v = kv.split("=", 1)
        cast = type(recipe[k])
        recipe[k] = v.lower() in ("1", "true", "yes") if cast is bool else cast(v)
    cache = Path(args.cache) if args.cache else A.default_cache_dir() / f"build_{args.world}"
    files = {
        "data": ["data.npz"],
        "text": ["text.pt"],
        "vae": ["vae.pt"],
        "latents": ["latents.pt"],
        "detector": ["detector.pt"],
        "unet": ["unet.pt", "unet_state.pt", "unet_partial.pt"],
    }
    for st in filter(None, args.force.split(",")):
        for f in files.get(st, []):
            (cache / f).unlink(missing_ok=True)
    b = Builder(recipe, cache, Path(args.assets), threads=args.threads)
    report = b.run([s for s in args.stages.split(",") if s])
    sys.stdout.write(
        json.dumps({"stage_times": report["stage_times"], "total_seconds": report["total_seconds"]}, indent=1)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
