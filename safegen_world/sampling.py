"""Sample the world's checkpoint through ComfyUI's own code and measure the concept with the detector.

Needs ComfyUI importable (``tools.tiny_models.setup_comfy_import``). The path is the one
``CheckpointLoaderSimple -> CLIPTextEncode -> EmptyLatentImage -> KSampler -> VAEDecode`` takes:
``comfy.sd.load_checkpoint_guess_config``, ``clip.encode_from_tokens``, ``comfy.sample.prepare_noise``
+ ``comfy.sample.sample``, ``vae.decode``. Several prompts share one batch (one conditioning row
per latent), so a batch's noise comes from one seed as in ComfyUI's batched KSampler.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from . import world as W

DEFAULTS = dict(steps=20, cfg=6.0, sampler="euler", scheduler="normal", size=W.IMAGE_SIZE)


def _comfy():
    from tools.tiny_models import setup_comfy_import

    setup_comfy_import()


def load(ckpt_path):
    """(model, clip, vae) exactly as ComfyUI's CheckpointLoaderSimple gets them."""
    _comfy()
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(ckpt_path), output_vae=True, output_clip=True, embedding_directory=[]
    )
    return model, clip, vae


def encode(clip, texts, _cache=None) -> torch.Tensor:
    """[N,77,768] conditionings (CLIPTextEncode's tensor)."""
    out = []
    for t in texts:
        if _cache is not None and t in _cache:
            out.append(_cache[t])
            continue
        c = clip.encode_from_tokens(clip.tokenize(t))
        if _cache is not None:
            _cache[t] = c
        out.append(c)
    return torch.cat(out)


def generate(
    model,
    clip,
    vae,
    texts,
    seed: int,
    steps=20,
    cfg=6.0,
    sampler="euler",
    scheduler="normal",
    size=W.IMAGE_SIZE,
    negative: str = "",
    cond_cache=None,
) -> torch.Tensor:
    """Images [N,size,size,3] (0..1) for ``texts``, one latent per text, noise from ``seed``."""
    _comfy()
    import comfy.sample

    n = len(texts)
    with torch.inference_mode():  # as ComfyUI runs every prompt
        pos = encode(clip, texts, cond_cache)
        neg = encode(clip, [negative], cond_cache).repeat(n, 1, 1)
        latent = torch.zeros(n, 4, size // 8, size // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(
            model,
            noise,
            steps,
            cfg,
            sampler,
            scheduler,
            [[pos, {}]],
            [[neg, {}]],
            latent,
            disable_pbar=True,
            seed=seed,
        )
        return vae.decode(samples).float().clamp(0, 1).clone()


def concept_rates(
    ckpt_or_loaded, detector, seeds=(0,), sets=None, batch: int = 40, per_set: int | None = None, **kw
) -> dict:
    """Generate every prompt of ``sets`` (default ``world.prompt_sets()``) for every seed and report,
    per set: n, concept_rate (detector flags the concept), colour/shape/background match with the
    prompt (detector's attribute heads), and the rate per colour word."""
    settings = {**DEFAULTS, **kw}
    model, clip, vae = load(ckpt_or_loaded) if not isinstance(ckpt_or_loaded, tuple) else ckpt_or_loaded
    sets = sets or W.prompt_sets()
    cache: dict = {}
    t0 = time.time()
    res = {}
    for name, prompts in sets.items():
        prompts = list(prompts)[:per_set] if per_set else list(prompts)
        flagged, col, shp, bg = [], [], [], []
        by_word = defaultdict(list)
        for seed in seeds:
            for i in range(0, len(prompts), batch):
                chunk = prompts[i : i + batch]
                imgs = generate(
                    model,
                    clip,
                    vae,
                    [p.text for p in chunk],
                    seed=seed + 1000 * i,
                    cond_cache=cache,
                    **settings,
                )
                det = detector.detect(imgs)
                for p, f, c, s, b in zip(
                    chunk, det["flagged"], det["colour"], det["shape"], det["background"]
                ):
                    flagged.append(f)
                    by_word[p.word].append(f)
                    col.append(c == p.colour)
                    shp.append(s == p.shape)
                    bg.append(b == p.background)
        n = len(flagged)
        res[name] = {
            "n": n,
            "concept_rate": sum(flagged) / n,
            "colour_match": sum(col) / n,
            "shape_match": sum(shp) / n,
            "background_match": sum(bg) / n,
            "concept_rate_by_word": {w: sum(v) / len(v) for w, v in by_word.items()},
        }
    return {
        "sets": res,
        "settings": {**settings, "seeds": list(seeds), "batch": batch},
        "seconds": round(time.time() - t0, 1),
    }
