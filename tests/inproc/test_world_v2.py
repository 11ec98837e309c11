"""The second miniature world (issue 18): its shipped assets, its text encoder and its instrument targets.

* the assets (UNet + VAE + the world CLIP's trained rows, the detector, the build report) are at most
  60 MiB and the report holds every stage's time and the targets it measured;
* the world CLIP that ``assets.ensure_checkpoint`` assembles is what ComfyUI runs: its conditioning of a
  caption equals ``final_layer_norm(row[token] + position)`` computed here from the asset's tensors, so a
  word means the same alone as inside a caption;
* the instrument targets (issue 18, ``build.TARGETS_V2``) hold when measured again here through
  ``comfy.sample`` on the shipped assets: base concept rates per prompt set, benign colour accuracy, a
  text negative of the bare word on implicit prompts (DSR and benign fidelity), SLD with the bare word
  on direct prompts. Fewer images than the build's eval (one seed for the large sets), same thresholds.
"""

from __future__ import annotations

import gc

import pytest
import torch

from tests.packload import comfy_ready

comfy_ready()
from safetensors.torch import load_file  # noqa: E402

from safegen_world import assets as A  # noqa: E402
from safegen_world import build as B  # noqa: E402
from safegen_world import grammar_v2 as G2  # noqa: E402
from safegen_world import sampling as S  # noqa: E402
from safegen_world import world as W  # noqa: E402
from safegen_world.detector import Detector  # noqa: E402

V = G2.WORLD_VERSION
if not A.model_path(V).is_file():  # reported by -ra in the summary, never silent
    pytest.skip(f"world {V} assets not shipped yet ({A.model_path(V).name}): build them with "
                f"`.venv/bin/python -m safegen_world.build --world {V} --threads 2` (docs/miniature-world.md)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def ckpt():
    return A.ensure_checkpoint(version=V)


@pytest.fixture(scope="module")
def loaded(ckpt):
    model, clip, vae = S.load(ckpt)
    yield model, clip, vae
    del model, clip, vae
    gc.collect()


def test_assets_small_and_report_complete():
    paths = [A.model_path(V), A.detector_path(V), A.build_info_path(V)]
    total = sum(p.stat().st_size for p in paths)
    assert total <= 60 * 2**20, total
    info = A.build_info(V)
    assert info["world_version"] == V
    for stage in ("data", "text", "vae", "latents", "detector", "unet", "write", "eval"):
        assert info["stage_times"][stage]["seconds"] >= 0, stage
    assert info["unet"]["complete"]
    targets = info["eval"]["targets"]
    assert set(targets) == set(B.instrument_targets(info["eval"], info["detector"])), "report lacks a target"
    assert all(t["met"] for t in targets.values()), {k: t for k, t in targets.items() if not t["met"]}
    assert info["text_check"]["max_abs_diff"] < 5e-3


def test_world_clip_is_what_comfyui_encodes(loaded, ckpt):
    _, clip, _ = loaded
    sd = load_file(str(ckpt))
    for k, v in sd.items():  # every encoder layer passes its input through
        if ".encoder.layers." in k and any(f".{r}" in k for r in A.RESIDUAL_OUTPUTS):
            assert not v.any(), k
    asset = load_file(str(A.model_path(V)))
    ids, rows = asset[A.WORLD_CLIP_IDS].long(), asset[A.WORLD_CLIP_ROWS].float()
    pos = sd[A.TEXT_MODEL + "embeddings.position_embedding.weight"].float()
    w, b = asset[A.FINAL_LN + "weight"].float(), asset[A.FINAL_LN + "bias"].float()
    row_of = {int(t): i for i, t in enumerate(ids)}

    def ours(text):
        tok = [int(t[0]) for t in clip.tokenize(text)["l"][0]]
        x = rows[[row_of[t] for t in tok]] + pos[: len(tok)]
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5)

    with torch.no_grad():
        for text in ("", "red", "a red star on a black background", "star", "a star on a grey background",
                     "crimson circle", "something blood-coloured on a white background"):
            theirs = clip.encode_from_tokens(clip.tokenize(text)).float()[0]
            assert (ours(text) - theirs).abs().max().item() < 5e-3, text
        # the bare word is the same vector alone and in a caption (same position: the token after BOS)
        alone = clip.encode_from_tokens(clip.tokenize("red")).float()[0, 1]
        first = clip.encode_from_tokens(clip.tokenize("red star, black background")).float()[0, 1]
        assert torch.allclose(alone, first, atol=5e-3)


def test_instrument_targets_through_comfy_sampler(ckpt, record_property):
    r = B.RECIPE_V2
    settings = dict(seeds=[0], steps=r["eval_steps"], cfg=r["eval_cfg"], sampler=r["eval_sampler"],
                    scheduler=r["eval_scheduler"])
    det = Detector.load(A.detector_path(V))
    res = B.evaluate_v2(ckpt, det, settings, negative=W.CONCEPT, sld_preset=r["eval_sld_preset"], small_set_seeds=4)
    targets = B.instrument_targets(res, A.build_info(V)["detector"])
    for k, t in targets.items():
        record_property(k, round(t["value"], 3))
    print({k: (round(t["value"], 3), t["target"]) for k, t in targets.items()})  # noqa: T201
    assert all(t["met"] for t in targets.values()), {k: t for k, t in targets.items() if not t["met"]}
