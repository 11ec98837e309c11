"""Safe Text Encoder (SafeText) on the tiny SD1 checkpoint's CLIP-L (random weights, full size).

One short training run (20 steps, AdamW lr 1e-4, λ 1, last 2 layers, 4+4 prompts per step) with the
pack's default prompt lists; then, on the training prompts AND on held-out prompts not in the lists:
* unsafe prompts' conditioning moves: mean token cosine (non-BOS) to the original below a target;
* safe prompts' conditioning stays: relative L2 change below a target;
* unsafe prompts move more than safe prompts (1 − cos compared on the same metric).
The CLIP is random, so "unsafe" vs "safe" is only lexical here (no semantics to separate): the
targets test the mechanism, not real-world selectivity.
Also: strength 0 equals the original encoder exactly, the saved delta file round-trips through
the loader node, full-weight files (AdvUnlearn/transformers layout, DES .pt) become differences.
"""
import logging

import pytest
import torch

from tests.packload import comfy_ready, pack_module

comfy_ready()
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

from tools.tiny_models import ensure  # noqa: E402

log = logging.getLogger(__name__)

HELD_UNSAFE = ["a naked person swimming in a lake", "nude woman sitting on a chair",
               "an unclothed man, full body photo", "a painting of a nude figure in a garden"]
HELD_SAFE = ["a red car parked on a street", "a woman in a blue sweater drinking coffee",
             "a forest path in autumn", "a man riding a bicycle in the city"]
# Targets (measured values in the report / record_property; see test body).
UNSAFE_COS_MAX = 0.975
SAFE_REL_MAX = 0.25


@pytest.fixture(scope="module")
def setup():
    _, clip, _, *_ = comfy.sd.load_checkpoint_guess_config(str(ensure("sd1")), output_model=False,
                                                           output_vae=False, output_clip=True,
                                                           embedding_directory=[])
    N, ST = pack_module("safegen_comfy.safetext"), pack_module("safegen_core.safetext")
    return clip, N, ST


@pytest.fixture(scope="module")
def trained(setup):
    clip, N, ST = setup
    U, S = ST.default_unsafe_prompts(), ST.default_safe_prompts()
    with torch.inference_mode():
        before = N.encode_each(clip, ["a nude person", "a cat"])
        res, fp, keys, stats = N.train_safetext(clip, U, S, lam=1.0, steps=20, lr=1e-4, batch_size=4, seed=0)
        after = N.encode_each(clip, ["a nude person", "a cat"])
    # training leaves the input CLIP untouched (deltas only lived inside the training forward)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    return res, keys, stats, U, S


def _measure(clip, patched, N, ST, prompts):
    with torch.inference_mode():
        o = N.encode_each(clip, prompts)
        n = N.encode_each(patched, prompts)
    cos = sum(ST.mean_cosine(a, b) for a, b in zip(n, o)) / len(prompts)
    rel = sum(ST.relative_l2(a, b) for a, b in zip(n, o)) / len(prompts)
    return cos, rel


def test_unsafe_move_safe_stay(setup, trained, record_property):
    clip, N, ST = setup
    res, keys, stats, U, S = trained
    assert all(k.startswith("clip_l.transformer.text_model.") for k in keys)
    patched = N.apply_deltas(clip, res.params, 1.0)
    nums = {}
    for label, prompts in (("train_unsafe", U), ("train_safe", S), ("held_unsafe", HELD_UNSAFE),
                           ("held_safe", HELD_SAFE)):
        nums[f"{label}_cos"], nums[f"{label}_rel"] = _measure(clip, patched, N, ST, prompts)
    nums.update(final_L_u=stats["final_L_u"], final_L_e=stats["final_L_e"], loss_last=res.losses[-1])
    for k, v in nums.items():
        record_property(k, v)
    log.warning("safe text encoder: %s", {k: round(v, 4) for k, v in nums.items()})
    for split in ("train", "held"):
        assert nums[f"{split}_unsafe_cos"] < UNSAFE_COS_MAX, nums
        assert nums[f"{split}_safe_rel"] < SAFE_REL_MAX, nums
        assert (1 - nums[f"{split}_unsafe_cos"]) > (1 - nums[f"{split}_safe_cos"]), nums


def test_node_schemas(setup):
    _, N, _ = setup
    for cls in pack_module("nodes.safe_text_encoder").NODES:
        sch = cls.define_schema()
        assert sch.node_id.startswith("SafeGen_") and sch.category.startswith("SafeGen/") and sch.description
        assert all(getattr(i, "tooltip", None) for i in sch.inputs + sch.outputs), cls


def test_strength_zero_is_original(setup, trained):
    clip, N, _ = setup
    res = trained[0]
    with torch.inference_mode():
        a = N.encode_each(clip, ["a nude person", "a cat"])
        b = N.encode_each(N.apply_deltas(clip, res.params, 0.0), ["a nude person", "a cat"])
        c = N.encode_each(N.apply_deltas(clip, res.params, 1.0), ["a nude person"])
        d = N.encode_each(clip, ["a nude person"])  # the input CLIP is not modified by patching a clone
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(c[0], d[0]) and torch.equal(d[0], a[0])


@pytest.fixture
def te_dir(tmp_path, monkeypatch):
    fnp = dict(folder_paths.folder_names_and_paths)
    fnp["text_encoders"] = ([str(tmp_path)], {".safetensors", ".pt"})
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", fnp)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return tmp_path


def test_node_saves_deltas_and_loader_round_trips(setup, te_dir):
    clip, N, ST = setup
    from safetensors import safe_open
    with torch.inference_mode():
        out = pack_module("nodes.safe_text_encoder").SafeTextEncoderTrainer.execute(clip, "a nude person\nnaked woman", "a cat\na house", 1.0, 2, 1e-4,
                                               "final layers (last 2)", 2, 0, 0, False, "t st")
    trained_clip, plot, info = out.args[:3] if hasattr(out, "args") else out.result[:3]
    path = te_dir / "t_st.safetensors"
    assert path.is_file() and plot.shape[-1] == 3 and "saved" in info
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        deltas = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["safegen_kind"] == N.DELTA_KIND and meta["layers"] == "final layers (last 2)"
    assert meta["unsafe_prompts"] == "2" and "base_clip_hash" in meta and "final_L_e" in meta
    assert len(deltas) == 34 and any(float(v.abs().max()) > 0 for v in deltas.values())
    with torch.inference_mode():
        loaded = pack_module("nodes.safe_text_encoder").SafeTextEncoder.execute(clip, "t_st.safetensors", 1.0, "a nude person")
        lclip, cond = (loaded.args if hasattr(loaded, "args") else loaded.result)[:2]
        ref = N.encode_each(trained_clip, ["a nude person"])[0]
        got = N.encode_each(lclip, ["a nude person"])[0]
    assert torch.equal(ref, got)
    assert torch.equal(cond[0][0], got)


def test_full_weight_files_become_differences(setup, te_dir):
    clip, N, _ = setup
    # the CLIP's stored weights (an earlier test's patched clone may still hold the shared modules patched)
    sd = pack_module("safegen_comfy.compat").clip_state_dict(clip)
    key = "clip_l.transformer.text_model.encoder.layers.11.mlp.fc2.bias"
    # AdvUnlearn / transformers layout: text_model.*, plus a position_ids buffer that must be ignored
    hf = {k[len("clip_l.transformer."):]: v.clone() for k, v in sd.items() if k.startswith("clip_l.transformer.text_model.")}
    hf["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    hf["text_model.encoder.layers.11.mlp.fc2.bias"] += 0.5
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in hf.items()}, str(te_dir / "advunlearn.safetensors"))
    deltas, _ = N.deltas_from_file(clip, str(te_dir / "advunlearn.safetensors"))
    assert list(deltas) == [key] and torch.allclose(deltas[key], torch.full_like(deltas[key], 0.5), atol=1e-3)
    # DES: torch.save({"model_state_dict": …}) of a CLIPTextModel (transformers 5 naming, no text_model.)
    des = {k[len("text_model."):]: v for k, v in hf.items() if k.startswith("text_model.")}
    torch.save({"model_state_dict": des, "epoch": 2}, str(te_dir / "checkpoint-2.pt"))
    deltas2, _ = N.deltas_from_file(clip, str(te_dir / "checkpoint-2.pt"))
    assert list(deltas2) == [key]
    # mismatches and NaN name the file and keys
    bad = dict(des)
    bad["encoder.layers.3.mlp.fc1.weight"] = torch.zeros(5, 5)
    torch.save({"model_state_dict": bad}, str(te_dir / "bad.pt"))
    with pytest.raises(ValueError, match=r"bad\.pt.*encoder\.layers\.3\.mlp\.fc1\.weight"):
        N.deltas_from_file(clip, str(te_dir / "bad.pt"))
    nan = {"text_model.final_layer_norm.bias": torch.full((768,), float("nan"))}
    save_file(nan, str(te_dir / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"nan\.safetensors.*final_layer_norm"):
        N.deltas_from_file(clip, str(te_dir / "nan.safetensors"))


def test_checkpoint_resume_matches_uninterrupted(setup, tmp_path, monkeypatch):
    clip, N, _ = setup
    monkeypatch.setattr(pack_module("safegen_comfy.common"), "checkpoint_dir", lambda kind, name: str(tmp_path / name))
    U, S = ["a nude person", "naked woman on a bed"], ["a cat", "a house by a lake"]
    kw = dict(lam=1.0, lr=1e-4, batch_size=1, seed=5)
    with torch.inference_mode():
        full, *_ = N.train_safetext(clip, U, S, steps=3, **kw)
        part, *_ = N.train_safetext(clip, U, S, steps=2, checkpoint_every=1, name="r", **kw)
        res, *_ = N.train_safetext(clip, U, S, steps=3, checkpoint_every=1, resume=True, name="r", **kw)
    assert res.resumed_from == 2 and len(res.losses) == 3
    for k in full.params:
        assert torch.allclose(full.params[k], res.params[k], atol=1e-7), k


# ----------------------------------------------------------------------------- SDXL (CLIP-L + CLIP-G)
# The tiny SDXL checkpoint's encoders are full-size and random. Its conditioning is the *penultimate*
# layer of both encoders (no final norm), so "final layers (last 2)" trains layers 9-10 of CLIP-L and
# 29-30 of CLIP-G; 2+2 prompts per step.
# Determinism (measured 2026-12-01, 2 cores): every reported number is the same (4 decimals) alone, in the full
# suite, with 1 or 2 threads, and on ComfyUI 0.3.75 and 0.33.0 — training draws only from per-step
# generators and no state of earlier tests reaches it. What does change it is the CPU kernel set: with
# the earlier settings (8 steps, lr 5e-4) safe rel was 0.3805 with the AVX-512 kernels and 0.3924 with
# ATEN_CPU_CAPABILITY=avx2 / MKL_ENABLE_INSTRUCTIONS=AVX2 (and 0.26-0.31 on an earlier machine): at that
# step size Adam moves every trained weight by ~lr per step whatever its gradient, so the short run
# amplifies kernel-level rounding and the safe prompts drift as much as the unsafe ones. At lr 2e-4 for
# 16 steps the gradient decides the direction: unsafe cos 0.940 train / 0.954 held-out, safe rel
# 0.207 / 0.241 (unsafe moves ~3x more than safe); with the AVX2 kernels 0.938 / 0.952 and 0.212 / 0.248.
# Targets below (unchanged).
SDXL_UNSAFE_COS_MAX = 0.975
SDXL_SAFE_REL_MAX = 0.35


@pytest.mark.sdxl
def test_sdxl_both_encoders_train(record_property):
    _, clip, _, *_ = comfy.sd.load_checkpoint_guess_config(str(ensure("sdxl")), output_model=False,
                                                           output_vae=False, output_clip=True,
                                                           embedding_directory=[])
    N, ST = pack_module("safegen_comfy.safetext"), pack_module("safegen_core.safetext")
    layers = N.conditioning_layers(clip)
    assert layers == {"clip_l.transformer.text_model.": (10, False), "clip_g.transformer.text_model.": (30, False)}
    U, S = ST.default_unsafe_prompts(), ST.default_safe_prompts()
    with torch.inference_mode():
        res, fp, keys, stats = N.train_safetext(clip, U, S, lam=1.0, steps=16, lr=2e-4, batch_size=2, seed=0)
    enc_layers = {(k.split(".")[0], k.split("layers.")[1].split(".")[0]) for k in keys}
    assert enc_layers == {("clip_l", "9"), ("clip_l", "10"), ("clip_g", "29"), ("clip_g", "30")}
    patched = N.apply_deltas(clip, res.params, 1.0)
    nums = {}
    # train sets measured on their first 6 prompts (CLIP-G encodes cost ~0.5 s each on CPU)
    for label, prompts in (("train_unsafe", U[:6]), ("train_safe", S[:6]), ("held_unsafe", HELD_UNSAFE),
                           ("held_safe", HELD_SAFE)):
        nums[f"{label}_cos"], nums[f"{label}_rel"] = _measure(clip, patched, N, ST, prompts)
    with torch.inference_mode():  # the pooled CLIP-G output (SDXL's size/pooled vector) moves too
        a = clip.encode_from_tokens(clip.tokenize(HELD_UNSAFE[0]), return_pooled=True)[1]
        b = patched.encode_from_tokens(patched.tokenize(HELD_UNSAFE[0]), return_pooled=True)[1]
        z = N.apply_deltas(clip, res.params, 0.0)
        c = z.encode_from_tokens(z.tokenize(HELD_UNSAFE[0]), return_pooled=True)[1]
    nums["held_unsafe_pooled_rel"] = ST.relative_l2(b, a)
    for k, v in nums.items():
        record_property(k, v)
    log.warning("safe text encoder SDXL: %s", {k: round(v, 4) for k, v in nums.items()})
    assert torch.equal(a, c)  # strength 0 = original, pooled output included
    assert nums["held_unsafe_pooled_rel"] > 0
    for split in ("train", "held"):
        assert nums[f"{split}_unsafe_cos"] < SDXL_UNSAFE_COS_MAX, nums
        assert nums[f"{split}_safe_rel"] < SDXL_SAFE_REL_MAX, nums
        assert (1 - nums[f"{split}_unsafe_cos"]) > (1 - nums[f"{split}_safe_cos"]), nums
