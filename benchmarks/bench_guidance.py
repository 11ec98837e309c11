"""Guidance nodes: per-sampling-step cost of INE negatives, SLD and SAFREE vs plain CFG.

    .venv/bin/python benchmarks/bench_guidance.py [--repeats 3] [--threads 1] [--steps 20]
                                                  [--samples 2] [--large 32] [--large-steps 6]

Targets (issue): per-step time, same run: INE negative vs text negative <= 1.02x; SLD vs plain
CFG <= 1.55x (three predictions batched); SAFREE overhead reported.

Every arm samples with ComfyUI's own ``comfy.sample.sample`` (what KSampler calls): euler /
normal, cfg 7, batch 1, seed 0, on the tiny SD1 checkpoint (``tools.tiny_models.ensure("sd1")``,
loaded by ``comfy.sd.load_checkpoint_guess_config``), under ``torch.inference_mode()`` like a
server prompt. Same positive prompt everywhere.

* ``text``:   plain CFG, negative = CLIPTextEncode of a text (``safegen_comfy.text.encode``).
* ``ine``:    plain CFG, negative = an implicit negative embedding: a random [1, 768] vector
  encoded through ``encode(clip, prompt_with_embedding(""), {"l": vec})``.
* ``sld``:    ``patch_model_sld(model, safety, medium preset)`` (the SLD Guidance node) with the
  text negative; safety = CLIPTextEncode of SLD's default concept. At the small latent the
  medium preset runs as is (its warm-up is the preset's 10/50 share of the run: 4 of 20 steps, SLD
  changes the result from step 4 on); at the large latent, with fewer steps, the medium values with
  warm-up 0. The safety
  prediction is computed on every step either way (the momentum is updated during warm-up).
* ``safree``: positive = ``safree_filter`` output (SAFREE Prompt Filter, nudity concept list,
  self-validating window resolved on the sampler's sigmas), model = ``patch_model_reattention`` with
  the node's default mode "off" (SAFREE's published setting: the model itself).
* ``safree_fft``: the same with re-attention "safeguard-low": the original prompt is predicted in
  the same UNet batch (3·B rows), and the patch is built with model_channels read as 80, so the
  tiny UNet's 320-channel output blocks count as the "4x" stage and get SAFREE's SafeGuard low
  filter (s1 = 0.9) on every step: what the re-attention costs when it has work to do.

Per step: ``comfy.sample.sample``'s callback stamps the end of each step (wall and process CPU
time); a step's time is the gap between consecutive stamps; the first step of each sample (it
includes ``process_conds`` and the sampler's setup) is left out of "ms/step" and shown
separately. A ``model_function_wrapper`` on every arm's model (same wrapper everywhere, a few
microseconds) counts UNet calls and batch rows per step and times the UNet part. An extra,
untimed 8x8 sample per process first (warm-up) also checks that SLD changed the CFG result on
the steps after its warm-up; the final latents of that sample are compared across arms.

Each (arm, repeat) is a fresh subprocess; the arms alternate (order rotated per repeat) so host
load hits them alike; "fastest" is the best process, "median" the median of the processes.
``--threads 1`` by default: on this 2-core host shared with other jobs, a second OpenMP
thread waiting for a busy core makes step times swing wildly. Sizes: 64x64 px -> 8x8 latents
(fixed per-call costs dominate) and ``--large`` (default 32 -> 256 px, compute-bound; 0 skips).
Writes benchmarks/results/guidance.json. Exits 0 whether or not the targets are met (the table
says PASS/FAIL); 1 only if the benchmark itself breaks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.workers import load_note, loadavg  # noqa: E402
from safegen_core.sld import SLDParams  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "guidance.json"
TARGET_INE = 1.02   # ine / text per-step time must be <= this
TARGET_SLD = 1.55   # sld / plain CFG per-step time must be <= this

ARMS = ("text", "ine", "sld", "safree", "safree_fft")
PROMPT = "a photo of a woman on the beach, nudity"
PROMPT_2 = "a painting of a man in a forest"  # second SAFREE filter call (concepts cached, new prompt)
NEG_TEXT = "nudity, violence, blood"
CFG = 7.0
SEED = 0
SMALL = 8  # latent side (64 px)
SAMPLER, SCHEDULER = "euler", "normal"


def out(s: str = "") -> None:
    sys.stdout.write(s + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------
# worker: one arm, fresh process
# ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def model_channels_read_as(mp, value: int):
    """Temporarily change the unet_config's model_channels that patch_model_reattention reads."""
    cfg = mp.model.model_config.unet_config
    old = cfg["model_channels"]
    cfg["model_channels"] = value
    try:
        yield
    finally:
        cfg["model_channels"] = old


def worker(arm: str, out_dir: str, threads: int, steps: int, samples: int, large: int,
           large_steps: int) -> None:
    import logging
    logging.disable(logging.WARNING)
    t_start = time.perf_counter()
    import torch
    if threads > 0:
        torch.set_num_threads(threads)
    from tests.packload import comfy_ready, pack_module
    comfy_ready()
    import comfy.sample
    import comfy.sd

    from tools.tiny_models import ensure
    gd = pack_module("safegen_comfy.sld")
    sfr = pack_module("safegen_comfy.safree")
    G = pack_module("safegen_comfy.text")
    sld = pack_module("safegen_core.sld")
    SF = pack_module("safegen_core.safree")
    res: dict = {"arm": arm, "threads": torch.get_num_threads(), "torch": torch.__version__}

    with torch.inference_mode():
        mp, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(ensure("sd1")), output_vae=True, output_clip=True, embedding_directory=[])
        res["unet_params"] = sum(p.numel() for p in mp.model.diffusion_model.parameters())
        res["unet_dtype"] = str(next(mp.model.diffusion_model.parameters()).dtype)
        pos = G.encode(clip, PROMPT)
        neg_text = G.encode(clip, NEG_TEXT)
        # per latent size: (model, positive, negative, steps)
        configs = {}
        sizes = [SMALL] + ([large] if large else [])
        steps_of = {SMALL: steps, large: large_steps}
        if arm == "text":
            for L in sizes:
                configs[L] = (mp, pos, neg_text)
        elif arm == "ine":
            g = torch.Generator().manual_seed(SEED)
            vec = torch.randn(1, 768, generator=g) * 0.02  # the tiny CLIP's token-embedding scale
            neg_ine = G.encode(clip, G.prompt_with_embedding(""), vectors={"l": vec})
            res["neg_shapes"] = {"text": list(neg_text[0][0].shape), "ine": list(neg_ine[0][0].shape)}
            res["ine_differs_from_text"] = not torch.equal(neg_ine[0][0], neg_text[0][0])
            for L in sizes:
                configs[L] = (mp, pos, neg_ine)
        elif arm == "sld":
            from dataclasses import asdict, replace
            safety = G.encode(clip, sld.DEFAULT_SAFETY_CONCEPT)
            res["safety_shape"] = list(safety[0][0].shape)
            medium = sld.SLD_PRESETS["medium"]
            res["sld_params_small"] = asdict(medium)
            configs[SMALL] = (gd.patch_model_sld(mp, safety, medium), pos, neg_text)
            if large:
                p_large = replace(medium, warmup_steps=0, warmup_fraction=None)
                res["sld_params_large"] = asdict(p_large)
                configs[large] = (gd.patch_model_sld(mp, safety, p_large), pos, neg_text)
        elif arm in ("safree", "safree_fft"):
            concepts = list(SF.NUDITY_CONCEPTS)
            G.encode(clip, PROMPT)
            t0 = time.perf_counter()
            G.encode(clip, PROMPT)
            t_enc = time.perf_counter() - t0
            t0 = time.perf_counter()
            filt_small, report, info = sfr.safree_filter(clip, PROMPT, concepts, [])
            t_cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            sfr.safree_filter(clip, PROMPT_2, concepts, [])
            t_new = time.perf_counter() - t0
            res["safree_filter"] = {"cold_s": t_cold, "new_prompt_s": t_new, "plain_encode_s": t_enc,
                                    "concepts": len(concepts), "report": report, "info": info,
                                    "conds": len(filt_small)}
            b1, b2, s1, s2 = SF.DEFAULT_FREEU_HYP
            if arm == "safree":  # re-attention off, SAFREE's published setting (the model itself)
                model = sfr.patch_model_reattention(mp, "off")
            else:  # SafeGuard low filter with the original prompt batched in
                original = G.encode(clip, PROMPT)
                with model_channels_read_as(mp, 80):  # 320 = 4 x 80: the tiny UNet's stages get (b1, s1)
                    model = sfr.patch_model_reattention(mp, "safeguard-low", original, b1, b2, s1, s2)
            configs[SMALL] = (model, filt_small, neg_text)
            if large:
                t0 = time.perf_counter()
                filt_large, _, info_l = sfr.safree_filter(clip, PROMPT, concepts, [])
                res["safree_filter"]["same_prompt_again_s"] = time.perf_counter() - t0
                res["safree_filter"]["info_large"] = info_l
                configs[large] = (model, filt_large, neg_text)
        else:
            raise SystemExit(f"unknown arm {arm}")
    res["setup_s"] = time.perf_counter() - t_start

    # UNet call counter / timer: the same wrapper on every arm's model
    unet_log: list[tuple[int, list, float]] = []

    def unet_wrapper(apply_model, args):
        t0 = time.perf_counter()
        r = apply_model(args["input"], args["timestep"], **args["c"])
        unet_log.append((int(args["input"].shape[0]), list(args["cond_or_uncond"]), time.perf_counter() - t0))
        return r

    def counted(m):
        m = m.clone()
        m.set_model_unet_function_wrapper(unet_wrapper)
        return m

    def run(m, pos_, neg_, L, n_steps, extra=None):
        noise = comfy.sample.prepare_noise(torch.zeros(1, 4, L, L), SEED)
        latent = torch.zeros(1, 4, L, L)
        stamps = []

        def cb(step, x0, x, total):
            stamps.append((time.perf_counter(), time.process_time(), len(unet_log)))

        unet_log.clear()
        t0 = (time.perf_counter(), time.process_time())
        with torch.inference_mode():
            y = comfy.sample.sample(m, noise, n_steps, CFG, SAMPLER, SCHEDULER, pos_, neg_, latent,
                                    seed=SEED, disable_pbar=True, callback=cb)
        t1 = (time.perf_counter(), time.process_time())
        assert len(stamps) == n_steps, (len(stamps), n_steps)
        prev = (t0[0], t0[1], 0)
        steps_ = []
        for s in stamps:
            calls = unet_log[prev[2]:s[2]]
            steps_.append({"wall": s[0] - prev[0], "cpu": s[1] - prev[1], "calls": len(calls),
                           "rows": [c[0] for c in calls], "cond_or_uncond": [c[1] for c in calls],
                           "unet": sum(c[2] for c in calls)})
            prev = s
        return y, {"total_wall": t1[0] - t0[0], "total_cpu": t1[1] - t0[1], "steps": steps_}

    # --- warm-up + verification sample at the small latent (untimed)
    m_small, pos_s, neg_s = configs[SMALL]
    mv = counted(m_small)
    changed = []
    if arm == "sld":
        run_obj = gd.sld_run_of(m_small)
        evals0 = run_obj.safety_evals

        def check(args):  # after SLD's post-CFG hook: did SLD change the plain CFG result?
            u, c = args["uncond_denoised"], args["cond_denoised"]
            plain = u + (c - u) * args["cond_scale"]
            changed.append(not torch.equal(args["denoised"], plain))
            return args["denoised"]
        mv.set_model_sampler_post_cfg_function(check)
    y, ver = run(mv, pos_s, neg_s, SMALL, steps)
    torch.save(y.clone(), os.path.join(out_dir, "final_small.pt"))
    res["verify"] = {"calls_per_step": [s["calls"] for s in ver["steps"]],
                     "rows_per_step": [s["rows"] for s in ver["steps"]],
                     "cond_or_uncond": ver["steps"][-1]["cond_or_uncond"]}
    if arm == "sld":
        res["verify"]["safety_evals"] = run_obj.safety_evals - evals0
        res["verify"]["sld_changed_steps"] = [i for i, ch in enumerate(changed) if ch]
        res["verify"]["post_cfg_calls"] = len(changed)

    # --- timed samples
    res["sizes"] = {}
    for L in sizes:
        m, p_, n_ = configs[L]
        mc = counted(m)
        n_samples = samples if L == SMALL else 1
        runs = [run(mc, p_, n_, L, steps_of[L])[1] for _ in range(n_samples)]
        later = [s for r in runs for s in r["steps"][1:]]
        first = [r["steps"][0] for r in runs]
        res["sizes"][str(L)] = {
            "steps": steps_of[L], "samples": n_samples,
            "ms_per_step": statistics.median(s["wall"] for s in later) * 1e3,
            "cpu_ms_per_step": statistics.median(s["cpu"] for s in later) * 1e3,
            "unet_ms_per_step": statistics.median(s["unet"] for s in later) * 1e3,
            "first_step_ms": min(s["wall"] for s in first) * 1e3,
            "mean_ms_per_step_incl_setup": min(r["total_wall"] for r in runs) / steps_of[L] * 1e3,
            "calls_per_step": sorted({s["calls"] for r in runs for s in r["steps"]}),
            "rows_per_call": sorted({x for r in runs for s in r["steps"] for x in s["rows"]}),
            "step_ms": [[round(s["wall"] * 1e3, 2) for s in r["steps"]] for r in runs],
        }
    res["process_s"] = time.perf_counter() - t_start
    Path(out_dir, "result.json").write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------

def run_arm(arm: str, a, out_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", arm, "--out", out_dir,
           "--threads", str(a.threads), "--steps", str(a.steps), "--samples", str(a.samples),
           "--large", str(a.large), "--large-steps", str(a.large_steps)]
    load0, t0 = loadavg(), time.perf_counter()
    p = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    rp = Path(out_dir, "result.json")
    if p.returncode != 0 or not rp.exists():
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
        raise SystemExit(f"{arm} worker failed (exit {p.returncode})")
    r = json.loads(rp.read_text())
    r["wall_s"] = time.perf_counter() - t0
    r["loadavg_1min"] = [load0, loadavg()]
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh processes per arm, interleaved (default 3; ~12-25 s each)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the workers (default 1; 0 = torch's default)")
    ap.add_argument("--steps", type=int, default=20, help="euler steps at the 8x8 latent (default 20)")
    ap.add_argument("--samples", type=int, default=2, help="timed 8x8 samples per process (default 2)")
    ap.add_argument("--large", type=int, default=32,
                    help="side of the larger latent (default 32 = 256 px; 0 skips it)")
    ap.add_argument("--large-steps", type=int, default=6,
                    help="euler steps at the larger latent (default 6; ~1.1 s/step plain)")
    ap.add_argument("--json", default=str(RESULTS))
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.out, a.threads, a.steps, a.samples, a.large, a.large_steps)
        return 0
    if a.steps < 3 or a.large_steps < 3 and a.large:
        ap.error("--steps and --large-steps must be >= 3")

    import torch
    from tools.tiny_models import ensure
    ensure("sd1")  # build once, outside the workers
    t_all = time.perf_counter()
    sizes = [SMALL] + ([a.large] if a.large else [])
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    finals: dict[str, list] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="safegen_bench_guidance_") as td:
        for i in range(a.repeats):
            k = i % len(ARMS)
            order = ARMS[k:] + ARMS[:k]  # rotate: no arm always runs first / last
            for arm in order:
                d = os.path.join(td, f"{arm}_{i}")
                os.makedirs(d)
                r = run_arm(arm, a, d)
                runs[arm].append(r)
                finals[arm].append(torch.load(os.path.join(d, "final_small.pt")))
                sys.stderr.write(f"[{arm} {i + 1}/{a.repeats}] "
                                 + ", ".join(f"{L}x{L} {r['sizes'][str(L)]['ms_per_step']:.1f} ms/step"
                                             for L in sizes)
                                 + f", load {r['loadavg_1min'][0]:.1f}->{r['loadavg_1min'][1]:.1f}, "
                                   f"{r['wall_s']:.0f} s\n")

    # ---- aggregate
    def agg(arm, L, key):
        vals = [r["sizes"][str(L)][key] for r in runs[arm]]
        return min(vals), statistics.median(vals)

    def m_spread(arm, L):
        vals = [r["sizes"][str(L)]["ms_per_step"] for r in runs[arm]]
        return max(vals) / min(vals)

    table = {}
    for arm in ARMS:
        for L in sizes:
            f, m = agg(arm, L, "ms_per_step")
            cf, cm = agg(arm, L, "cpu_ms_per_step")
            uf, um = agg(arm, L, "unet_ms_per_step")
            s0 = runs[arm][0]["sizes"][str(L)]
            table[(arm, L)] = {"fastest": f, "median": m, "cpu_fastest": cf, "cpu_median": cm,
                               "unet_fastest": uf, "unet_median": um,
                               "first_step_ms": min(r["sizes"][str(L)]["first_step_ms"] for r in runs[arm]),
                               "mean_incl_setup": min(r["sizes"][str(L)]["mean_ms_per_step_incl_setup"]
                                                      for r in runs[arm]),
                               "calls_per_step": s0["calls_per_step"], "rows_per_call": s0["rows_per_call"],
                               "steps": s0["steps"], "all": [r["sizes"][str(L)]["ms_per_step"]
                                                             for r in runs[arm]],
                               "spread": m_spread(arm, L)}

    def ratio(arm, L, base="text"):
        t, b = table[(arm, L)], table[(base, L)]
        return {"fastest": t["fastest"] / b["fastest"], "median": t["median"] / b["median"],
                "cpu": t["cpu_fastest"] / b["cpu_fastest"], "unet": t["unet_fastest"] / b["unet_fastest"]}

    ratios = {arm: {str(L): ratio(arm, L) for L in sizes} for arm in ARMS if arm != "text"}
    verdict = {}
    for L in sizes:
        verdict[f"ine_{L}"] = ratios["ine"][str(L)]["fastest"] <= TARGET_INE
        verdict[f"sld_{L}"] = ratios["sld"][str(L)]["fastest"] <= TARGET_SLD

    # ---- verification
    ver = {arm: runs[arm][0]["verify"] for arm in ARMS}
    sver = ver["sld"]
    n = a.steps
    sld_batched = (all(c == 1 for c in sver["calls_per_step"]) and all(r == [3] for r in sver["rows_per_step"])
                   and sorted(sver["cond_or_uncond"][0]) == [0, 1, 2] and sver["safety_evals"] == n)
    plain_batched = all(c == 1 for c in ver["text"]["calls_per_step"]) and all(
        r == [2] for r in ver["text"]["rows_per_step"])
    equal_work_ine = ver["ine"]["rows_per_step"] == ver["text"]["rows_per_step"]
    diffs = {arm: float((finals[arm][0] - finals["text"][0]).abs().max()) for arm in ARMS if arm != "text"}
    repro = {arm: max(float((x - finals[arm][0]).abs().max()) for x in finals[arm]) for arm in ARMS}
    # the preset's warm-up is its share of the reference's 50 steps (safegen_core.sld.SLDParams.warmup):
    # medium 10/50 -> 4 of 20 steps
    medium_warmup = SLDParams(**runs["sld"][0]["sld_params_small"]).warmup(n)
    changed = sver["sld_changed_steps"]
    sld_active_ok = changed == list(range(medium_warmup, n))
    ok = sld_batched and plain_batched and equal_work_ine and sld_active_ok

    # ---- report
    r0 = runs["text"][0]
    loads = [x for arm in ARMS for r in runs[arm] for x in r["loadavg_1min"]]
    ncpu = os.cpu_count() or 1
    out()
    out(f"Guidance per-step cost -- tiny SD1 UNet ({r0['unet_params'] / 1e6:.1f}M params, {r0['unet_dtype']}, "
        f"CPU, {r0['threads']} torch thread(s)), comfy.sample.sample {SAMPLER}/{SCHEDULER}, cfg {CFG}, batch 1; "
        f"{a.repeats} fresh process(es) per arm, interleaved")
    out(f"  latents: {SMALL}x{SMALL} ({SMALL * 8} px): {a.samples} x {a.steps} steps per process"
        + (f"; {a.large}x{a.large} ({a.large * 8} px): 1 x {a.large_steps} steps per process" if a.large else ""))
    out("  ms/step = median step time after the first step (wall), fastest process (median of processes); "
        "cpu = process CPU time; UNet = inside apply_model; ratios vs 'text' (plain CFG, text negative)")
    out()
    hdr = (f"{'arm':11} {'latent':>6} {'ms/step':>8} {'(median)':>9} {'cpu ms':>7} {'UNet ms':>8} "
           f"{'other ms':>8} {'1st step':>8} {'calls x rows':>12} {'spread':>6} | {'ratio':>6} {'(median)':>8} "
           f"{'cpu':>6} {'UNet':>6} {'target':>7} {'':4}")
    out(hdr)
    out("-" * len(hdr))
    targets = {"ine": TARGET_INE, "sld": TARGET_SLD}
    for arm in ARMS:
        for L in sizes:
            t = table[(arm, L)]
            cr = f"{t['calls_per_step']}x{t['rows_per_call']}".replace(" ", "")
            line = (f"{arm:11} {'%dx%d' % (L, L):>6} {t['fastest']:8.2f} {'(%.2f)' % t['median']:>9} "
                    f"{t['cpu_fastest']:7.2f} {t['unet_fastest']:8.2f} {t['fastest'] - t['unet_fastest']:8.2f} "
                    f"{t['first_step_ms']:8.1f} {cr:>12} {t['spread']:6.2f} | ")
            if arm == "text":
                line += f"{'1.000':>6}"
            else:
                rr = ratios[arm][str(L)]
                tg = targets.get(arm)
                line += (f"{rr['fastest']:6.3f} {'(%.3f)' % rr['median']:>8} {rr['cpu']:6.3f} {rr['unet']:6.3f} "
                         + (f"{'<= %s' % tg:>7} {'PASS' if rr['fastest'] <= tg else 'FAIL':4}" if tg
                            else f"{'report':>7}"))
            out(line.rstrip())
    out("  calls x rows = UNet calls per step x batch rows per call; other = ms/step - UNet (sampler, CFG, "
        "hooks); 1st step includes process_conds / sampler setup (fastest process); spread = slowest / fastest "
        "process of the arm (same work: host noise)")

    out()
    out("Targets:")
    for L in sizes:
        ri, rs = ratios["ine"][str(L)], ratios["sld"][str(L)]
        out(f"  INE negative vs text negative, {L}x{L}: {ri['fastest']:.3f}x (median {ri['median']:.3f}x, "
            f"cpu {ri['cpu']:.3f}x) <= {TARGET_INE}  {'PASS' if verdict[f'ine_{L}'] else 'FAIL'}")
    out("    (INE and text negatives make identical UNet calls, verified below: a deviation from 1.0 within the "
        "arms' process-to-process spread (" + ", ".join(f"{L}x{L} text {table[('text', L)]['spread']:.2f}, "
                                                      f"ine {table[('ine', L)]['spread']:.2f}" for L in sizes)
        + ") is host noise, not a cost of the embedding)")
    for L in sizes:
        rs = ratios["sld"][str(L)]
        out(f"  SLD vs plain CFG, {L}x{L}: {rs['fastest']:.3f}x (median {rs['median']:.3f}x, "
            f"cpu {rs['cpu']:.3f}x) <= {TARGET_SLD}  {'PASS' if verdict[f'sld_{L}'] else 'FAIL'}")
    for L in sizes:
        out(f"  SAFREE per step, {L}x{L}: re-attention node as is {ratios['safree'][str(L)]['fastest']:.3f}x, "
            f"with the FFT filter active {ratios['safree_fft'][str(L)]['fastest']:.3f}x "
            f"({table[('safree_fft', L)]['fastest'] - table[('text', L)]['fastest']:+.2f} ms/step vs text, "
            f"{table[('safree_fft', L)]['fastest'] - table[('safree', L)]['fastest']:+.2f} ms/step vs the node as is)"
            "  (reported)")
    sf = [r["safree_filter"] for r in runs["safree"] + runs["safree_fft"]]
    f0 = sf[0]
    out(f"  SAFREE prompt filter, one-time per prompt (fastest of {len(sf)} processes): cold "
        f"{min(x['cold_s'] for x in sf):.2f} s ({f0['concepts']} concept phrases + masked prompts encoded), "
        f"new prompt with concepts cached {min(x['new_prompt_s'] for x in sf):.2f} s"
        + (f", same prompt again {min(x['same_prompt_again_s'] for x in sf):.2f} s" if a.large else "")
        + f"; plain CLIPTextEncode of the prompt {min(x['plain_encode_s'] for x in sf):.3f} s  (reported)")
    out(f"    filter report: {f0['report'].replace(chr(10), ' | ')}")

    out()
    out("Verification (untimed 8x8 sample in each worker, UNet calls counted by a model_function_wrapper):")
    cu = sver["cond_or_uncond"][0]
    out(f"  SLD: {sum(c == 1 for c in sver['calls_per_step'])}/{n} steps with exactly 1 UNet call; rows per call "
        f"{sorted({x for r in sver['rows_per_step'] for x in r})} (cond_or_uncond {cu}: cond, uncond, safety); "
        f"safety predictions {sver['safety_evals']}/{n}; SLD changed the CFG result at steps "
        f"{changed[0] if changed else '-'}..{changed[-1] if changed else '-'} ({len(changed)} of {n}, warm-up "
        f"{medium_warmup}) -> {'OK' if sld_batched and sld_active_ok else 'NOT AS EXPECTED'}")
    out(f"  plain CFG (text): {sorted(set(ver['text']['calls_per_step']))} call(s)/step x "
        f"{sorted({x for r in ver['text']['rows_per_step'] for x in r})} rows; INE: "
        f"{sorted(set(ver['ine']['calls_per_step']))} x {sorted({x for r in ver['ine']['rows_per_step'] for x in r})}"
        f" -> same UNet work {'OK' if equal_work_ine else 'DIFFERENT'}; INE negative shape "
        f"{runs['ine'][0]['neg_shapes']['ine']} vs text {runs['ine'][0]['neg_shapes']['text']}")
    out(f"  final 8x8 latent (text: max |x| {float(finals['text'][0].abs().max()):.3g}) max|arm - text|: "
        + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
        + "; max spread between repeats of an arm: " + f"{max(repro.values()):.1g}")

    # ---- explanation of the SLD ratio with numbers
    out()
    out("Why SLD costs what it costs (fastest processes):")
    for L in sizes:
        t, s = table[("text", L)], table[("sld", L)]
        u_r = s["unet_fastest"] / t["unet_fastest"]
        out(f"  {L}x{L}: UNet {t['unet_fastest']:.2f} ms for 2 rows -> {s['unet_fastest']:.2f} ms for 3 rows "
            f"({u_r:.2f}x; 1.5x = rows); everything else per step {t['fastest'] - t['unet_fastest']:.2f} -> "
            f"{s['fastest'] - s['unet_fastest']:.2f} ms (SLD hooks + momentum math: "
            f"+{(s['fastest'] - s['unet_fastest']) - (t['fastest'] - t['unet_fastest']):.2f} ms)")
    out("  One batched call of 3 rows costs at most 1.5x the 2-row call when the UNet is compute-bound "
        "(per-row work); at 8x8 a share of each call is per-call overhead (Python/module dispatch, small "
        "GEMMs) that does not grow with rows, so the ratio is lower. ComfyUI batched cond+uncond(+safety) "
        "into one call on CPU here (its memory check passes), so plain CFG is already 2 rows/step.")
    for L in sizes:
        if not verdict[f"sld_{L}"]:
            out(f"  {L}x{L} MISSES <= {TARGET_SLD}: the UNet alone went {table[('sld', L)]['unet_fastest'] / table[('text', L)]['unet_fastest']:.2f}x "
                "for 1.5x the rows; the rest is the non-UNet overhead above and host noise (see loads).")
    note = load_note(loads, "wall times are noisy (fastest-process and cpu ratios are the steadier ones).")
    if note:
        out(note)

    wall = time.perf_counter() - t_all
    report = {
        "benchmark": "guidance",
        "command": " ".join([".venv/bin/python benchmarks/bench_guidance.py", *(argv or sys.argv[1:])]),
        "targets": {"ine_vs_text_max": TARGET_INE, "sld_vs_cfg_max": TARGET_SLD},
        "config": {"prompt": PROMPT, "negative": NEG_TEXT, "cfg": CFG, "sampler": SAMPLER, "scheduler": SCHEDULER,
                   "seed": SEED, "latents": sizes, "steps": {str(SMALL): a.steps, **({str(a.large): a.large_steps}
                                                                                    if a.large else {})},
                   "samples_small": a.samples, "repeats": a.repeats, "torch_threads": r0["threads"],
                   "unet_params": r0["unet_params"], "unet_dtype": r0["unet_dtype"],
                   "sld_params": {"small": runs["sld"][0]["sld_params_small"],
                                  "large": runs["sld"][0].get("sld_params_large")}},
        "ratios": ratios, "pass": verdict,
        "table": {f"{arm}_{L}": v for (arm, L), v in table.items()},
        "safree_filter": sf,
        "verification": {"sld_batched_3_rows_1_call": sld_batched, "plain_batched_2_rows": plain_batched,
                         "ine_same_unet_work": equal_work_ine, "sld_changed_steps": changed,
                         "sld_active_as_expected": sld_active_ok, "final_latent_max_diff_vs_text": diffs,
                         "repeat_spread": repro, "per_arm": ver},
        "runs": runs, "max_loadavg_1min": max(loads) if loads else None, "wall_seconds": wall,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                 "cpus": ncpu},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    jp = Path(a.json)
    jp.parent.mkdir(parents=True, exist_ok=True)
    jp.write_text(json.dumps(report, indent=1) + "\n")
    out(f"wrote {jp.relative_to(REPO) if jp.is_relative_to(REPO) else jp} ({wall:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
