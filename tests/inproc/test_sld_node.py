"""SLD in-process on the tiny SD1 checkpoint: the model patch against ``safegen_core.sld.sld_guidance``
on the very predictions the sampler made, per-image momentum, state reset between runs, the guider,
warm-up shares and two-evaluation samplers. SAFREE: tests/inproc/test_safree_node.py.
"""
import pytest
import torch

from tests.packload import comfy_ready, pack_module

comfy_ready()
import comfy.patcher_extension as pe  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402

from tools.tiny_models import ensure  # noqa: E402

STEPS = 5
CFG = 5.0


@pytest.fixture(scope="module")
def gd():
    return pack_module("safegen_comfy.sld")


@pytest.fixture(scope="module")
def core():
    return pack_module("safegen_core.sld")


@pytest.fixture(scope="module")
def tiny():
    mp, clip, *_ = comfy.sd.load_checkpoint_guess_config(str(ensure("sd1")), output_vae=False,
                                                         output_clip=True)
    with torch.inference_mode():
        enc = {k: clip.encode_from_tokens_scheduled(clip.tokenize(t)) for k, t in
               {"pos": "a photo of a cat", "neg": "", "safety": "nudity, violence, blood"}.items()}
    return mp, clip, enc


def params(core, **kw):
    base = dict(warmup_steps=2, guidance_scale=200.0, threshold=0.0, momentum_scale=0.5, momentum_beta=0.6)
    base.update(kw)
    return core.SLDParams(**base)


def sample(model, enc, noise, steps=STEPS, cfg=CFG, sampler="euler"):
    latent = torch.zeros_like(noise)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", enc["pos"], enc["neg"],
                                   latent, seed=0, disable_pbar=True).clone()


def noise_for(batch, seed=0):
    return comfy.sample.prepare_noise(torch.zeros(batch, 4, 8, 8), seed)


def test_patched_step_equals_sld_guidance_on_captured_predictions(tiny, gd, core):
    mp, _, enc = tiny
    p = params(core)
    m = gd.patch_model_sld(mp, enc["safety"], p)
    batches, seen, steps = [], [], []

    def calc_wrapper(executor, model, conds, x_in, timestep, model_options):
        out = executor(model, conds, x_in, timestep, model_options)
        seen.append({"n_conds": len(conds), "x": x_in.clone(), "sigma": timestep.clone(),
                     "preds": [o.clone() for o in out]})
        return out

    def unet_wrapper(apply_model, args):
        batches.append((args["input"].shape[0], list(args["cond_or_uncond"])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    def capture(args):  # runs after SLD's post-CFG hook
        steps.append({"x": args["input"].clone(), "sigma": args["sigma"].clone(),
                      "out": args["denoised"].clone(),
                      "sched": args["model_options"]["transformer_options"].get("sample_sigmas")})
        return args["denoised"]

    m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "test", calc_wrapper)
    m.set_model_unet_function_wrapper(unet_wrapper)
    m.set_model_sampler_post_cfg_function(capture)
    noise = noise_for(2)
    sample(m, enc, noise)

    # the sampler publishes its schedule; the step index is read from it
    expected_sched = comfy.samplers.calculate_sigmas(mp.get_model_object("model_sampling"), "normal", STEPS)
    assert len(steps) == STEPS and all(s["sched"] is steps[0]["sched"] for s in steps)
    torch.testing.assert_close(steps[0]["sched"].cpu(), expected_sched)
    # three conditions, ONE UNet call per step with 3 x batch rows (cond, uncond, safety)
    assert [s["n_conds"] for s in seen] == [3] * STEPS
    assert len(batches) == STEPS and all(b == 6 and sorted(c) == [0, 1, 2] for b, c in batches)

    ref_state = core.SLDState()
    for i, (ev, st) in enumerate(zip(seen, steps)):
        assert torch.equal(ev["x"], st["x"])
        x, s = ev["x"], ev["sigma"].reshape(-1, 1, 1, 1)
        cond_d, uncond_d, safety_d = ev["preds"]
        eps = [(x - d) / s for d in (uncond_d, cond_d, safety_d)]
        want = core.sld_guidance(*eps, i, p, ref_state, CFG)
        got = (x - st["out"]) / s
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        if i < p.warmup_steps:  # warm-up: the plain CFG result, bit for bit
            assert torch.equal(st["out"], uncond_d + (cond_d - uncond_d) * CFG)
        else:
            assert not torch.allclose(st["out"], uncond_d + (cond_d - uncond_d) * CFG)
    run = gd.sld_run_of(m)
    assert run.state.calls == STEPS and run.safety_evals == STEPS
    assert torch.equal(run.state.momentum, ref_state.momentum)


def test_batch_keeps_per_image_momentum(tiny, gd, core):
    mp, _, enc = tiny
    m = gd.patch_model_sld(mp, enc["safety"], params(core))
    noise = noise_for(2, seed=3)
    both = sample(m, enc, noise)
    run = gd.sld_run_of(m)
    assert run.state.momentum.shape[0] == 2
    for b in range(2):
        alone = sample(m, enc, noise[b:b + 1])
        scale = float(alone.abs().max())
        torch.testing.assert_close(both[b:b + 1], alone, rtol=0, atol=2e-4 * scale)
    # the momentum matters here, so the check above would see images sharing it
    no_mom = sample(gd.patch_model_sld(mp, enc["safety"], params(core, momentum_scale=0.0)), enc, noise)
    assert (no_mom - both).abs().max() > 1e-2 * float(both.abs().max())


def test_second_run_resets_state(tiny, gd, core):
    mp, _, enc = tiny
    m = gd.patch_model_sld(mp, enc["safety"], params(core))
    noise = noise_for(1, seed=5)
    first = sample(m, enc, noise)
    run = gd.sld_run_of(m)
    assert run.runs == 1 and run.state.calls == STEPS
    second = sample(m, enc, noise)
    assert run.runs == 2 and run.state.calls == STEPS
    assert torch.equal(first, second)
    # Without the OUTER_SAMPLE wrapper (a path that bypasses CFGGuider.sample): the safety cond is
    # prepared by the fallback and the run is detected from the new schedule object.
    m2 = m.clone()
    m2.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, gd.WRAPPER_KEY)
    a = sample(m2, enc, noise)
    b = sample(m2, enc, noise)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, first, rtol=0, atol=1e-5 * float(first.abs().max()))
    # the same schedule object sampled twice: reset when the sigma is back at the first step
    run.new_run()
    run.runs = 0
    sched = torch.tensor([14.6, 3.0, 0.9, 0.0])
    mo = {"transformer_options": {"sample_sigmas": sched}}
    assert [run.step_index(torch.tensor([s]), mo)[0] for s in (14.6, 3.0, 0.9)] == [0, 1, 2]
    run.state.calls = 3
    assert run.step_index(torch.tensor([14.6]), mo) == (0, 3)
    assert run.state.calls == 0 and run.runs == 1


def test_disabled_or_all_warmup_is_plain_cfg_exactly(tiny, gd, core):
    mp, _, enc = tiny
    noise = noise_for(1, seed=9)
    plain = sample(mp, enc, noise)
    for p in (params(core, guidance_scale=0.0), params(core, warmup_steps=STEPS)):
        m = gd.patch_model_sld(mp, enc["safety"], p)
        assert torch.equal(sample(m, enc, noise), plain)
        assert gd.sld_run_of(m).safety_evals == 0
    # cfg == 1: ComfyUI skips the unconditional prediction, SLD is off (as in diffusers)
    m = gd.patch_model_sld(mp, enc["safety"], params(core))
    assert torch.equal(sample(m, enc, noise, cfg=1.0), sample(mp, enc, noise, cfg=1.0))


def test_guider_equals_model_patch(tiny, gd, core):
    mp, _, enc = tiny
    p = params(core)
    noise = noise_for(2, seed=11)
    patched = sample(gd.patch_model_sld(mp, enc["safety"], p), enc, noise)
    guider = gd.Guider_SLD(mp)
    guider.set_conds(enc["pos"], enc["neg"], enc["safety"])
    guider.set_sld(CFG, p)
    sigmas = comfy.samplers.calculate_sigmas(mp.get_model_object("model_sampling"), "normal", STEPS)
    with torch.inference_mode():
        out = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                            seed=0, disable_pbar=True)
        out2 = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                             seed=0, disable_pbar=True)
    assert torch.equal(out, patched)
    assert torch.equal(out2, out)  # the guider resets its state per run too
    assert guider.run.runs == 2 and guider.run.safety_evals == 2 * STEPS


def capture_evaluations(m):
    """Record every guided evaluation: the predictions (cond, uncond, safety) and the final x0."""
    seen, outs = [], []

    def calc_wrapper(executor, model, conds, x_in, timestep, model_options):
        out = executor(model, conds, x_in, timestep, model_options)
        if len(conds) == 3:
            seen.append({"x": x_in.clone(), "sigma": timestep.clone(), "preds": [o.clone() for o in out],
                         "sched": model_options["transformer_options"]["sample_sigmas"]})
        return out

    def capture(args):
        outs.append(args["denoised"].clone())
        return args["denoised"]

    m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "test", calc_wrapper)
    m.set_model_sampler_post_cfg_function(capture)
    return seen, outs


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_two_evaluation_sampler_advances_momentum_once_per_step(tiny, gd, core, sampler):
    mp, _, enc = tiny
    p = params(core, warmup_steps=1)
    m = gd.patch_model_sld(mp, enc["safety"], p)
    seen, outs = capture_evaluations(m)
    out = sample(m, enc, noise_for(1), steps=3, sampler=sampler)
    assert torch.isfinite(out).all()
    run = gd.sld_run_of(m)
    # 2 evaluations per step except the last (sigma 0 next): 5 evaluations, 3 steps, 3 momentum updates
    assert run.safety_evals == run.state.evals == 5 and run.state.calls == 3
    # replay: each evaluation at its nearest schedule index; the momentum advances once per index
    idx = [core.sigma_to_step_index(ev["sigma"], ev["sched"]) for ev in seen]
    assert sorted(set(idx)) == [0, 1, 2] and idx == sorted(idx)
    ref = core.SLDState()
    for ev, got, step in zip(seen, outs, idx):
        x, s = ev["x"], ev["sigma"].reshape(-1, 1, 1, 1)
        cond_d, uncond_d, safety_d = ev["preds"]
        eps = [(x - d) / s for d in (uncond_d, cond_d, safety_d)]
        want = core.sld_guidance(*eps, step, p, ref, CFG, 3)
        torch.testing.assert_close((x - got) / s, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # the per-evaluation count (the old behaviour) gives another image
    naive = core.SLDState()
    last = None
    for i, ev in enumerate(seen):
        x, s = ev["x"], ev["sigma"].reshape(-1, 1, 1, 1)
        cond_d, uncond_d, safety_d = ev["preds"]
        last = core.sld_guidance(*[(x - d) / s for d in (uncond_d, cond_d, safety_d)], i, p, naive, CFG, 3)
    assert not torch.allclose(last, (seen[-1]["x"] - outs[-1]) / seen[-1]["sigma"].reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("scheduler", ["normal", "karras"])
@pytest.mark.parametrize("steps", [20, 30, 50])
def test_preset_warmup_covers_the_reference_share_of_the_run(tiny, gd, core, steps, scheduler):
    """MEDIUM's warm-up is 10 of diffusers' 50 steps: 20% of the run at any step count/scheduler."""
    mp, _, enc = tiny
    p = core.SLD_PRESETS["medium"]
    m = gd.patch_model_sld(mp, enc["safety"], p)
    seen, outs = capture_evaluations(m)
    latent = torch.zeros(1, 4, 8, 8)
    with torch.inference_mode():
        comfy.sample.sample(m, noise_for(1, seed=4), steps, CFG, "euler", scheduler, enc["pos"], enc["neg"], latent,
                            seed=0, disable_pbar=True)
    assert len(seen) == len(outs) == steps
    changed = [not torch.equal(o, ev["preds"][1] + (ev["preds"][0] - ev["preds"][1]) * CFG)
               for ev, o in zip(seen, outs)]
    first = changed.index(True)
    assert not any(changed[:first]) and all(changed[first:])
    assert abs(first - 0.2 * steps) <= 1, (steps, scheduler, first)
    if steps == 50:
        assert first == 10  # diffusers' sld_warmup_steps index


def test_presets(gd, core):
    assert gd.sld_params("strong", 0, 0, 0, 0, 0) == core.SLD_PRESETS["strong"]
    assert gd.sld_params("custom", 3, 7.0, 0.1, 0.2, 0.3) == core.SLDParams(3, 7.0, 0.1, 0.2, 0.3)
