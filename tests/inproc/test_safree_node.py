"""SAFREE in-process on the tiny SD1 and SDXL checkpoints.

* Prompt filter, SD1: structure of the conditioning; the self-validating window resolved on the
  sampler's sigmas covers SAFREE's share of the run at 20/30/50 steps with two schedulers, and at 50
  steps/normal exactly SAFREE's loop indices 0..k.
* Prompt filter, SDXL: only the CLIP-G columns change, equal to an independent implementation of the
  reference's SDXL projection (``tests/unit/test_safree_reference._np_safree_projection_sdxl``) fed
  with pooled vectors from ComfyUI's own ``encode_from_tokens``.
* Latent re-attention: off (the default) is the model itself, so the sampled latent equals the
  filter-only run bit for bit; safeguard-low predicts the original prompt in the same UNet batch and
  filters exactly the filtered-prompt rows, = the numpy re-implementation of
  ``SafeGuard_Low_Fourier_filter`` on the very features of the run.
"""
import numpy as np
import pytest
import torch

from tests.packload import comfy_ready, pack_module
from tests.unit.test_safree_reference import _np_low_batch, _np_safree_projection_sdxl

comfy_ready()
import comfy.patcher_extension as pe  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

from tools.tiny_models import ensure  # noqa: E402

CONCEPTS = ["Nudity", "Erotic Art", "Sexual Acts", "Pornography"]
PROMPT = "a photo of nudity on the beach"


@pytest.fixture(scope="module")
def sfr():
    return pack_module("safegen_comfy.safree")


def load(kind):
    mp, clip, *_ = comfy.sd.load_checkpoint_guess_config(str(ensure(kind)), output_vae=False, output_clip=True,
                                                         embedding_directory=[])
    return mp, clip


@pytest.fixture(scope="module")
def sd1():
    return load("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return load("sdxl")


def encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def run(model, pos, neg, steps, scheduler="normal", sampler="euler", seed=0, size=8):
    lat = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(lat, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 5.0, sampler, scheduler, pos, neg, lat, seed=seed,
                                   disable_pbar=True).clone()


def filtered(sfr, clip, self_validating=True, up_t=10):
    with torch.inference_mode():
        return sfr.safree_filter(clip, PROMPT, CONCEPTS, [], self_validating=self_validating, up_t=up_t)


def test_sd1_filter_structure(sd1, sfr):
    _, clip = sd1
    plain = encode(clip, PROMPT)
    cond, report, info = filtered(sfr, clip, up_t=10)
    off, _, info_off = filtered(sfr, clip, self_validating=False)
    assert info["flagged"] > 0, report
    k = info["svf_last_step"]
    assert 0 <= k <= 10 and info["share"] == (k + 1) / 50
    (fc, fx), (oc, ox) = cond
    # marked for the sampler; until then start/end percent hold the same share of the timesteps
    assert fx[sfr.WINDOW_KEY] == ("filtered", info["share"]) and ox[sfr.WINDOW_KEY] == ("original", info["share"])
    assert fx["start_percent"] == 0.0 and fx["end_percent"] == ox["start_percent"] == info["share"]
    assert fx["hooks"] is ox["hooks"]
    assert torch.equal(oc, plain[0][0])
    torch.testing.assert_close(off[0][0], fc)
    assert info_off["share"] == 1.0 and len(off) == 1 and sfr.WINDOW_KEY not in off[0][1]
    # only flagged token positions changed; BOS, EOS and padding untouched
    changed = (fc[0] != plain[0][0][0]).any(-1).nonzero().reshape(-1).tolist()
    toks = clip.tokenize(PROMPT)
    eos = sfr._eos_index(toks["l"][0], clip.tokenizer.clip_l)
    assert changed and len(changed) == info["flagged"] and min(changed) >= 1 and max(changed) < eos
    # SD1 "pooled" vectors are the EOS hidden states of the conditioning layer (= pooler_output)
    with torch.inference_mode():
        p = sfr._pooled(clip, "l", [toks["l"][0]])
        _, pooled = clip.encode_from_tokens(toks, return_pooled=True)
    torch.testing.assert_close(p[0], pooled[0].float())


def positive_rows_used(model, pos, neg, fc, oc, steps, scheduler):
    """Per sampling step: 'filtered' or 'original', read from the UNet's c_crossattn rows."""
    used = []

    def unet_wrapper(apply_model, args):
        c = args["c"]["c_crossattn"]
        labels = list(args["cond_or_uncond"])
        n = c.shape[0] // len(labels)
        row = c[labels.index(0) * n]
        if torch.equal(row, fc[0].to(row)):
            used.append("filtered")
        elif torch.equal(row, oc[0].to(row)):
            used.append("original")
        else:
            used.append("?")
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(unet_wrapper)
    run(m, pos, neg, steps, scheduler)
    return used


@pytest.mark.parametrize("scheduler", ["normal", "karras"])
@pytest.mark.parametrize("steps", [20, 30, 50])
def test_window_is_safrees_share_of_the_run(sd1, sfr, steps, scheduler):
    mp, clip = sd1
    cond, _, info = filtered(sfr, clip, up_t=10)
    k = info["svf_last_step"]
    assert 1 <= k + 1 < 50 and len(cond) == 2
    fc, oc = cond[0][0], cond[1][0]
    used = positive_rows_used(mp, cond, encode(clip, ""), fc, oc, steps, scheduler)
    assert len(used) == steps and "?" not in used
    m = used.count("filtered")
    assert used == ["filtered"] * m + ["original"] * (steps - m)  # filtered first, then original
    assert abs(m - (k + 1) / 50 * steps) <= 1, (steps, scheduler, k, m)
    if steps == 50:
        assert m == k + 1  # SAFREE's loop indices 0..k (i <= beta_adjusted)
    assert m == sfr.window_steps(info["share"], steps)


def test_window_conds_are_not_changed_by_sampling(sd1, sfr):
    """The hook resolves the window on the run's copies: the node's output stays as it was, and a
    second run with another step count resolves it again."""
    mp, clip = sd1
    cond, _, info = filtered(sfr, clip)
    before = [dict(c[1]) for c in cond]
    used20 = positive_rows_used(mp, cond, encode(clip, ""), cond[0][0], cond[1][0], 20, "normal")
    used50 = positive_rows_used(mp, cond, encode(clip, ""), cond[0][0], cond[1][0], 50, "normal")
    assert [dict(c[1]) for c in cond] == before
    assert used20.count("filtered") == sfr.window_steps(info["share"], 20)
    assert used50.count("filtered") == info["svf_last_step"] + 1


def test_sdxl_projects_only_clip_g_as_the_reference(sdxl, sfr):
    _, clip = sdxl
    plain = encode(clip, PROMPT)
    cond, report, info = filtered(sfr, clip)
    assert info["sdxl"] and info["svf_last_step"] is None and len(cond) == 1, report
    assert "CLIP-G" in report and "every step" in report
    new = cond[0][0]
    assert info["flagged"] > 0, report
    # CLIP-L columns and the pooled vector bit-identical
    assert torch.equal(new[..., :768], plain[0][0][..., :768])
    assert torch.equal(cond[0][1]["pooled_output"], plain[0][1]["pooled_output"])
    assert not torch.equal(new[..., 768:], plain[0][0][..., 768:])
    # independent: pooled = CLIP-G's projected pooled output via ComfyUI's own encode_from_tokens
    toks = clip.tokenize(PROMPT)
    g_chunk = toks["g"][0]
    end = 49407
    eos = next(i for i in range(1, len(g_chunk)) if g_chunk[i][0] == end)
    positions = list(range(1, eos))
    with torch.inference_mode():
        concept = torch.cat([clip.encode_from_tokens(clip.tokenize(c), return_pooled=True)[1] for c in CONCEPTS])
        masked = []
        for p in positions:
            t = {"l": toks["l"], "g": [list(g_chunk)]}
            t["g"][0][p] = (0, 1.0)
            masked.append(clip.encode_from_tokens(t, return_pooled=True)[1])
        masked = torch.cat(masked)
    cat = torch.stack([plain[0][0][0], plain[0][0][0]]).double().numpy()
    ref, ref_flags, margin = _np_safree_projection_sdxl(cat, masked.double().numpy(), concept.double().numpy(),
                                                        alpha=0.01)
    assert margin > 1e-6 and int(ref_flags.sum()) == info["flagged"]
    got = new[0].double().numpy()
    scale = np.abs(ref[1]).max()
    assert np.abs(got - ref[1]).max() <= 1e-4 * scale


def test_reattention_off_is_the_filter_only_run(sd1, sfr):
    mp, clip = sd1
    cond, _, _ = filtered(sfr, clip, self_validating=False)
    neg = encode(clip, "")
    assert sfr.patch_model_reattention(mp, "off") is mp
    assert torch.equal(run(sfr.patch_model_reattention(mp, "off", encode(clip, PROMPT)), cond, neg, 4),
                       run(mp, cond, neg, 4))


def test_reattention_safeguard_low_filters_the_filtered_rows(sd1, sfr):
    mp, clip = sd1
    cond, _, _ = filtered(sfr, clip, self_validating=False)
    original, neg = encode(clip, PROMPT), encode(clip, "")
    m = sfr.patch_model_reattention(mp, "safeguard-low", original, 1.0, 1.0, 0.9, 0.2)
    state = m.model_options["safegen_safree_reattention"]
    state.model_channels = 80  # the tiny UNet's decoder has 320 channels only: make that the 4x stage (b1, s1)
    patches = m.model_options["transformer_options"]["patches"]["output_block_patch"]
    inner = patches[-1]
    seen = []

    def spy(h, hsp, to):
        out = inner(h, hsp, to)
        seen.append((hsp.clone(), out[1].clone(), list(to["cond_or_uncond"])))
        return out

    patches[-1] = spy
    filtered_run = run(m, cond, neg, 3)
    # one UNet call per evaluation with positive (0), negative (1) and the original prompt (2), any order
    assert seen and all(sorted(labels) == [0, 1, 2] for _, _, labels in seen)
    for before, after, labels in seen:
        f, u, o = labels.index(0), labels.index(1), labels.index(2)
        ref, _ = _np_low_batch(before.numpy()[[u, f, o]], 1, 0.9)  # reference layout [uncond, filtered, original]
        np.testing.assert_allclose(after[f].numpy(), ref[1], rtol=0, atol=1e-4 * np.abs(ref[1]).max())
        assert not torch.allclose(after[f], before[f], atol=1e-3)
        assert torch.equal(after[u], before[u]) and torch.equal(after[o], before[o])
    assert state.applied == len(seen)
    assert not torch.equal(filtered_run, run(mp, cond, neg, 3))
    with pytest.raises(ValueError, match="original"):
        sfr.patch_model_reattention(mp, "safeguard-low", None)
    with pytest.raises(ValueError, match="mode"):
        sfr.patch_model_reattention(mp, "freeu", original)
