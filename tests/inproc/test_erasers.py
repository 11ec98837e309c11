"""ESD Concept Eraser and Dark Miner Eraser in-process, on the tiny *concept model*.

Model: tools/concept_model.py — the tiny SD1 UNet trained so that "a red square" and "a blue
circle" (through the tiny checkpoint's random CLIP-L) and a hidden embedding produce distinct
latent patterns (shipped in tests/assets). The concept erased is "a red square"; "a blue circle"
and the empty prompt are the unrelated / benign prompts.

Measured (all with fixed draws, so before/after comparisons are paired):
* ESD: the training loss falls (first vs last 10 % of steps); the erased model's concept
  prediction approaches the ESD target ε* = ε0(∅) − η(ε0(c) − ε0(∅)) on fixed evaluation
  points (partial samples of the original model); unrelated prompts' predictions move much less
  than the concept's (bound below). NB: with a random CLIP the prompts' conditionings share most
  of their 77 tokens (BOS, EOS padding), so cross-attention edits for one prompt partly move the
  others; the bound is stated relative to the concept's own change and in absolute terms.
* Dark Miner (one round): the verify score (concept gain, safegen_core.darkminer) of the
  embedding mined in that round drops after the round's fine-tuning, measured here
  independently of the node (own draws, original vs output MODEL); benign prompts stay within
  a stated bound.
* Both: the saved file through the Unlearned UNet Loader (strength 1) gives the eraser MODEL's
  predictions (≤ 1e-5); the input MODEL is unchanged; a cancelled ESD run leaves no hooks and
  the resumed run ends bit-identical to an uninterrupted one.
"""
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from tests.packload import comfy_ready, pack_module

comfy_ready()
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sample  # noqa: E402
import folder_paths  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tools.concept_model import ensure  # noqa: E402

log = logging.getLogger(__name__)
LAT = 4
RES = LAT * 8
CONCEPT, OTHER = "a red square", "a blue circle"
# Stated bounds (measured values are logged and recorded; see the report)
ESD_TARGET_RATIO_MAX = 0.35      # target error after / before
ESD_LOSS_RATIO_MAX = 0.6         # mean loss last 10 % / first 10 %
UNRELATED_VS_CONCEPT_MAX = 0.75  # relative change of an unrelated prompt / of the concept
UNRELATED_ABS_MAX = 0.12         # relative change of an unrelated prompt's ε (‖Δε‖/‖ε‖)
CONCEPT_PATTERN_MOVE_MIN = 1.5   # concept samples' distance to the concept pattern, after / before
DM_BENIGN_ABS_MAX = 0.15
DM_BENIGN_VS_CONCEPT_MAX = 0.6


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops are dominated by thread hand-off on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(one_thread):
    ck, _ = ensure()
    mp, clip, _vae, *_ = comfy.sd.load_checkpoint_guess_config(str(ck), output_vae=False, output_clip=True,
                                                               embedding_directory=[])
    mods = {n: pack_module(p) for n, p in (("ESD", "safegen_core.esd"), ("DM", "safegen_core.darkminer"),
                                          ("L", "safegen_comfy.unlearned"))}
    esd, dm, text = (pack_module(f"safegen_comfy.{n}") for n in ("esd", "dark_miner", "text"))
    mods["E"] = SimpleNamespace(
        text_cond=esd.text_cond, esd_erase=esd.esd_erase, dark_miner=dm.dark_miner,
        generate_concept_latents=dm.generate_concept_latents,
        ESDConceptEraser=pack_module("nodes.esd").ESDConceptEraser,
        DarkMinerEraser=pack_module("nodes.dark_miner").DarkMinerEraser,
        save_round_state=mods["DM"].save_round_state, _state_files=mods["DM"].state_files,
        load_round_state=mods["DM"].load_round_state)
    mods["G"] = SimpleNamespace(predict_eps=pack_module("safegen_comfy.compat").predict_eps, encode=text.encode,
                                model_sigmas=pack_module("safegen_comfy.common").model_sigmas,
                                prompt_with_embedding=text.prompt_with_embedding)
    with torch.inference_mode():
        conds = {t: mods["E"].text_cond(clip, t) for t in (CONCEPT, OTHER, "")}
    return mp, clip, mods, conds


@pytest.fixture
def dirs(tmp_path, monkeypatch, setup):
    fnp = dict(folder_paths.folder_names_and_paths)
    fnp["diffusion_models"] = ([str(tmp_path / "dm")], {".safetensors"})
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", fnp)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(pack_module("safegen_comfy.common"), "checkpoint_dir",
                        lambda kind, name: str(tmp_path / "ck" / kind / name))
    return tmp_path


def predict(mp, seed=0):
    """Raw UNet output of a (patched) MODEL on a fixed input."""
    mm.load_models_gpu([mp], force_full_load=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, LAT, LAT, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        return mp.model.diffusion_model(x, timesteps=torch.tensor([700.0, 60.0]), context=ctx).clone()


def eps_of(G, original, erased):
    """eps_fn over two MODELs: ``erased=True`` → the erased MODEL, else the original."""
    def eps(x, s, c, is_erased):
        m = erased if is_erased else original
        mm.load_models_gpu([m], force_full_load=True)
        with torch.no_grad():
            return G.predict_eps(m, x, s, c[0], c[1], LAT, LAT).clone()
    return eps


def samples(G, model, clip, text, seeds=range(4)):
    """Sampled latents (model space), 12 euler steps, CFG 3, one seed per row."""
    pos, neg = G.encode(clip, text), G.encode(clip, "")
    lat = torch.zeros(len(seeds), 4, LAT, LAT)
    noise = torch.cat([comfy.sample.prepare_noise(lat[:1], s) for s in seeds])
    out = comfy.sample.sample(model, noise, 12, 3.0, "euler", "normal", pos, neg, lat, seed=0,
                              disable_pbar=True)
    return model.model.process_latent_in(out)


def no_hooks_left(mp):
    return not [n for n, m in mp.model.diffusion_model.named_modules()
                if m.__dict__.get("weight_function") or m.__dict__.get("bias_function")]


def check_loader_roundtrip(mods, mp, m, path, kind):
    loaded, info = mods["L"].apply_unlearned(mp, str(path), 1.0)
    diff = (predict(loaded) - predict(m)).abs().max().item()
    assert info["kind"] == kind, info
    assert diff <= 1e-5, f"loader vs eraser MODEL: {diff}"
    assert (predict(m) - predict(mp)).abs().max().item() > 1e-4, "the erasure must change the model"
    return diff


def test_esd_erases_concept_keeps_others_and_file_reloads(setup, dirs, record_property):
    mp, clip, mods, conds = setup
    E, G, ESD = mods["E"], mods["G"], mods["ESD"]
    base_before = predict(mp)
    with torch.inference_mode():
        out = E.ESDConceptEraser.execute(mp, clip, CONCEPT, "x", 1.0, 30, 1e-3, 0, 4, 3.0, RES, "erased",
                                         "t_esd", 0, 2, 0, False)
    m, info = out.result[0], out.result[2]
    path = dirs / "dm" / "t_esd.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["method"] == "ESD" and meta["variant"] == "esd-x" and meta["concept"] == CONCEPT
    assert meta["steps"] == "30" and float(meta["eta"]) == 1.0 and float(meta["lr"]) == 1e-3
    assert meta["seed"] == "0"
    assert len(meta["base_model_hash"]) == 16 and keys and all(".attn2." in k for k in keys)
    assert all(k.startswith("model.diffusion_model.") for k in keys)
    assert str(path) in info

    sigmas = ESD.ddim_sigmas(G.model_sigmas(mp), 4)
    with torch.inference_mode(False):
        eps = eps_of(G, mp, m)
        pts = ESD.eval_points(eps, conds[CONCEPT], conds[""], sigmas, [2, 4, LAT, LAT], 6, seed=9)
        err0 = ESD.target_error(eps, pts, conds[CONCEPT], conds[""], 1.0, erased=False)
        err1 = ESD.target_error(eps, pts, conds[CONCEPT], conds[""], 1.0, erased=True)
        ch = {t: ESD.relative_change(eps, pts, conds[t]) for t in conds}
        # how different the prompts are on the original model (context for the bound)
        a = torch.cat([eps(x, s, ESD.cat_conds([conds[OTHER]], [x.shape[0]]), False) for x, s in pts])
        b = torch.cat([eps(x, s, ESD.cat_conds([conds[CONCEPT]], [x.shape[0]]), False) for x, s in pts])
        prompt_gap = ((a - b).norm() / b.norm()).item()
    # images: the concept model draws "a red square" as pattern 1 of the shipped patterns
    red = load_file(str(ensure()[1]))["patterns"][1]
    with torch.inference_mode():
        dist = {k: (samples(G, mod, clip, CONCEPT) - red).flatten(1).norm(dim=1).mean().item()
                for k, mod in (("before", mp), ("after", m))}
    nums = dict(loss_first10=float(meta["loss_mean_first_10pct"]),
                loss_last10=float(meta["loss_mean_last_10pct"]), target_err_before=err0,
                target_err_after=err1,
                change_concept=ch[CONCEPT], change_other=ch[OTHER], change_empty=ch[""],
                prompt_gap_original=prompt_gap, concept_samples_to_pattern_before=dist["before"],
                concept_samples_to_pattern_after=dist["after"])
    nums["loader_max_diff"] = check_loader_roundtrip(mods, mp, m, path, "partial: cross-attention (ESD-x)")
    for k, v in nums.items():
        record_property(k, v)
    log.warning("ESD on the concept model: %s", {k: f"{v:.4g}" for k, v in nums.items()})
    assert nums["loss_last10"] < ESD_LOSS_RATIO_MAX * nums["loss_first10"], nums
    assert err1 < ESD_TARGET_RATIO_MAX * err0, nums
    for t in (OTHER, ""):
        assert ch[t] < UNRELATED_VS_CONCEPT_MAX * ch[CONCEPT] and ch[t] < UNRELATED_ABS_MAX, nums
    assert dist["after"] > CONCEPT_PATTERN_MOVE_MIN * dist["before"], nums
    assert torch.equal(predict(mp), base_before), "the input MODEL must be unchanged"
    assert no_hooks_left(mp)


def test_esd_cancel_then_resume_equals_uninterrupted(setup, dirs, monkeypatch):
    mp, clip, mods, _ = setup
    E = mods["E"]
    kw = dict(variant="x-strict", eta=1.0, steps=6, learning_rate=1e-3, seed=4, sampling_steps=3,
              resolution=RES, checkpoint_every=3)
    base_before = predict(mp)
    with torch.inference_mode():
        full = E.esd_erase(mp, clip, CONCEPT, name="t_full", resume=False, **kw)["result"]
        real = mm.throw_exception_if_processing_interrupted
        ckdir = dirs / "ck" / "esd" / "t_resume"

        def interrupt_after_first_checkpoint():
            # ComfyUI checks for interrupts in every op (comfy/ops.py run_every_op) and our loop each step
            if (ckdir / "step_0000003.safetensors").exists():
                raise mm.InterruptProcessingException()
            real()
        monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt_after_first_checkpoint)
        with pytest.raises(mm.InterruptProcessingException):
            E.esd_erase(mp, clip, CONCEPT, name="t_resume", resume=False, **kw)
        monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", real)
        assert no_hooks_left(mp) and torch.equal(predict(mp), base_before)
        resumed = E.esd_erase(mp, clip, CONCEPT, name="t_resume", resume=True, **kw)["result"]
    assert resumed.resumed_from == 3
    assert resumed.losses == full.losses
    assert all(torch.equal(resumed.params[k], full.params[k]) for k in full.params)


def test_bad_inputs_are_named(setup, dirs):
    mp, clip, mods, _ = setup
    E = mods["E"]
    with torch.inference_mode():
        with pytest.raises(ValueError, match="concept is empty"):
            E.esd_erase(mp, clip, "   ")
        with pytest.raises(ValueError, match="'esd-z'"):
            E.esd_erase(mp, clip, CONCEPT, variant="esd-z")
        with pytest.raises(ValueError, match="concept is empty"):
            E.dark_miner(mp, clip, "", [OTHER])
        with pytest.raises(ValueError, match="'q'"):
            E.dark_miner(mp, clip, CONCEPT, [OTHER], variant="q")


def test_esd_refuses_a_concept_the_model_does_not_see(setup, dirs):
    """A UNet whose cross-attention ignores the text (attn2.to_k/to_v zeroed by `set` patches): ε(c) =
    ε(∅) for every concept, so ESD has nothing to erase and must say so before training, writing
    nothing. The unpatched model passes the same check for the same concept."""
    mp, clip, mods, _ = setup
    E = mods["E"]
    sd = mp.model_state_dict()
    blind = mp.clone()
    keys = [k for k in sd if ".attn2.to_k." in k or ".attn2.to_v." in k]
    assert keys
    blind.add_patches({k: ("set", (torch.zeros_like(sd[k]),)) for k in keys}, 1.0)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"nothing to erase .*'a red square'.*relative difference"):
            E.esd_erase(blind, clip, CONCEPT, variant="x", steps=2, learning_rate=1e-3, sampling_steps=3,
                        resolution=RES, name="t_esd_blind")
        out = E.esd_erase(mp, clip, CONCEPT, variant="x", steps=1, learning_rate=1e-3, sampling_steps=3,
                          resolution=RES, name="t_esd_sees")
    assert not (dirs / "dm" / "t_esd_blind.safetensors").exists()
    assert out["concept_difference"] > 1e-2 and out["loss_rose"] is False


@pytest.mark.sdxl
def test_esd_u_selection_on_sdxl_follows_each_reference():
    """On the tiny SDXL UNet: xt_sampler erased = CompVis 'noxattn' (every parameter but attn2, out.*,
    time_embed*; norms train), original = esd_sd.py 'esd-u' (Linear/Conv2d modules without attn2; no
    norms, time_embed and out.2 train). ESD-x is the same set under both."""
    ESD = pack_module("safegen_core.esd")
    from tools.tiny_models import ensure as ensure_tiny
    mp, *_ = comfy.sd.load_checkpoint_guess_config(str(ensure_tiny("sdxl")), output_vae=False, output_clip=False)
    unet = mp.model.diffusion_model
    names = [n for n, _ in unet.named_parameters()]
    comp = set(ESD.select_parameters(unet, "u", "erased"))
    diff = set(ESD.select_parameters(unet, "u", "original"))
    assert comp == {n for n in names if not (n.startswith("out.") or "attn2" in n or "time_embed" in n)}
    assert any(".norm" in n or "in_layers.0" in n for n in comp)  # norms train in CompVis ESD-u
    mods = dict(unet.named_modules())
    for n in diff:
        mod = mods[n.rsplit(".", 1)[0]]
        assert isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and "attn2" not in n
    assert "time_embed.0.weight" in diff and "out.2.weight" in diff and "time_embed.0.weight" not in comp
    assert set(ESD.select_parameters(unet, "x", "erased")) == set(ESD.select_parameters(unet, "x", "original"))
    assert any("label_emb" in n for n in comp)  # SDXL's size/pooled embedding trains under CompVis' rule


def test_dark_miner_round_lowers_mined_embedding_score(setup, dirs, record_property):
    mp, clip, mods, conds = setup
    E, G, ESD, DM = mods["E"], mods["G"], mods["ESD"], mods["DM"]
    base_before = predict(mp)
    args = dict(rounds=1, mining_steps=10, mining_lr=0.03, circumvent_steps=20, learning_rate=1e-3, eta=1.0,
                anchor_weight=1.0, sampling_steps=6, start_guidance=3.0, resolution=RES, concept_images=8,
                verify_draws=6, verify_margin=0.0, seed=0)
    with torch.inference_mode():
        out = E.DarkMinerEraser.execute(mp, clip, CONCEPT, OTHER, "x", args["rounds"], args["mining_steps"],
                                        args["mining_lr"], args["circumvent_steps"], args["learning_rate"],
                                        args["eta"], args["anchor_weight"], args["sampling_steps"],
                                        args["start_guidance"], RES, args["concept_images"],
                                        args["verify_draws"],
                                        args["verify_margin"], args["seed"], "erased", "t_dm", 0, 2, 0, False)
        m, emb, info = out.result[0], out.result[1], out.result[3]
        # the same concept images the node made (deterministic), its held-out part
        lat = E.generate_concept_latents(mp, clip, CONCEPT, 8, RES, 6, 3.0, 0)
    _, held = DM.split_latents(lat)
    path = dirs / "dm" / "t_dm.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["method"] == "Dark Miner" and meta["rounds_run"] == "1" and meta["concept"] == CONCEPT
    with torch.inference_mode(False):
        eps = eps_of(G, mp, m)
        mined = E.text_cond(clip, G.prompt_with_embedding("{}"), emb["vectors"])
        sig = G.model_sigmas(mp)
        v = {}
        for when, erased in (("before", False), ("after", True)):
            for name, c in (("mined", mined), ("text", conds[CONCEPT])):
                v[f"{name}_{when}"] = DM.verify(eps, held, sig, c, conds[""], [conds[OTHER]], draws=8,
                                                batch=4, seed=1234, erased=erased)
        pts = ESD.eval_points(eps, conds[CONCEPT], conds[""], ESD.ddim_sigmas(sig, 6), [2, 4, LAT, LAT], 6,
                              seed=9)
        ch = {t: ESD.relative_change(eps, pts, conds[t]) for t in conds}
    nums = {f"gain_{k}": x.score for k, x in v.items()}
    nums.update({f"relative_{k}": x.relative for k, x in v.items()})
    nums.update(change_concept=ch[CONCEPT], change_other=ch[OTHER], change_empty=ch[""])
    nums["loader_max_diff"] = check_loader_roundtrip(mods, mp, m, path, "partial: cross-attention (ESD-x)")
    for k, x in nums.items():
        record_property(k, x)
    log.warning("Dark Miner on the concept model: %s\n%s", {k: f"{x:.4g}" for k, x in nums.items()}, info)
    assert v["mined_before"].induces, nums                       # mining found an embedding that induces it
    assert v["mined_before"].score > v["text_before"].score, nums  # … more strongly than the concept's words
    assert v["mined_after"].score < 0.5 * v["mined_before"].score, nums
    assert not v["mined_after"].induces, nums
    for t in (OTHER, ""):
        assert ch[t] < DM_BENIGN_ABS_MAX and ch[t] < DM_BENIGN_VS_CONCEPT_MAX * ch[CONCEPT], nums
    assert torch.equal(predict(mp), base_before) and no_hooks_left(mp)


def test_dark_miner_round_state_roundtrip(setup, tmp_path):
    """The per-round resumable state: deltas, mined embeddings and records come back; other settings
    are refused."""
    _, _, mods, _ = setup
    E, DM = mods["E"], mods["DM"]
    g = torch.Generator().manual_seed(0)
    deltas = {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(3, generator=g)}
    pool = [DM.Mined({"l": torch.randn(2, 768, generator=g)}, 0.5),
            DM.Mined({"l": torch.randn(2, 768, generator=g)}, 0.25)]
    v = DM.Verdict(0.1, 0.0, 1.0, 0.1, True, [-0.2])
    recs = [DM.RoundRecord(1, 0.5, v, v, [1.0, 0.5]), DM.RoundRecord(2, 0.25, v, v, [0.4])]
    fp = {"method": "dark_miner", "seed": 3}
    for i in (1, 2):
        E.save_round_state(str(tmp_path), recs[:i], pool[:i], deltas, fp, keep=1)
    assert [r for r, _ in E._state_files(str(tmp_path))] == [2]
    into = {k: torch.zeros_like(t) for k, t in deltas.items()}
    got_recs, got_pool, nxt = E.load_round_state(str(tmp_path), fp, into)
    assert nxt == 3 and got_recs == recs and all(torch.equal(into[k], deltas[k]) for k in deltas)
    assert [m.loss for m in got_pool] == [0.5, 0.25]
    assert all(torch.equal(a.vectors["l"], b.vectors["l"]) for a, b in zip(got_pool, pool))
    with pytest.raises(ValueError, match="different settings.*seed"):
        E.load_round_state(str(tmp_path), dict(fp, seed=4), into)
