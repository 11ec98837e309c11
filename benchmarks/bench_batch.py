"""Batch runner: N prompts through a real ComfyUI server vs the same sampling in-process; and two
servers vs one.

    .venv/bin/python benchmarks/bench_batch.py [--prompts 50] [--steps 20] [--size 64] [--repeats 2]

Targets (issue 6): 50 prompts on the tiny model through a real server (the batch runner) vs the
same sampling in-process: wall time <= 1.10x; two servers vs one: throughput ratio reported.

Work per prompt, identical in every arm: tiny SD1 checkpoint (``tools.tiny_models.ensure("sd1")``),
CLIPTextEncode of a distinct prompt, KSampler (euler / normal, ``--steps``, cfg 7, a distinct
seed, ``--size`` px), VAEDecode (TAESD), SaveImage (PNG, ComfyUI's compress level 4). The negative
("") and the empty latent are made once: the server caches those nodes too.

Arms (each a fresh process / fresh server processes; order rotated per repeat):

* ``inproc_t1`` (``inproc_t2`` only with ``--arms``): ComfyUI imported in one Python process (``tests.packload``),
  the stock node classes called directly (``nodes.CLIPTextEncode().encode``,
  ``nodes.KSampler().sample``, ``nodes.VAEDecode().decode``, ``nodes.SaveImage().save_images``)
  under ``torch.inference_mode()`` as the server runs them; torch threads 1 / 2. Timed from the
  first to the last of the N prompts, after one warm-up prompt (model loaded, kernels warm).
* ``server_t1`` / ``server_t2``: one ComfyUI server started with OMP_NUM_THREADS=1 / 2; one
  warm-up prompt over HTTP; then ``python -m safegen_batch run`` (2 prompts in flight) as a
  subprocess, timed from its start to its exit: runner start-up, POST /prompt, websocket,
  /history, /view image download, PNG written again on the client side, fsync'ed JSONL rows.
* ``two_servers_t1``: two servers, OMP_NUM_THREADS=1 each, one batch run balanced over both.

Reported: wall time and prompts/s per arm (fastest of the repeats; all kept in the JSON), CPU
seconds per prompt (in-process: the process; server arms: the servers' + the runner's CPU time),
overhead = server / in-process at equal threads (target on 1 thread; 2 threads reported), and
the throughput ratios two servers (1 thread each) vs one server (2 threads; same 2 cores) and vs
one server (1 thread). Writes benchmarks/results/batch.json. Exits 0 whether or not the target
is met (the table says PASS/FAIL); 1 only if the benchmark itself breaks.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.workers import load_note, loadavg  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "batch.json"
TARGET_OVERHEAD = 1.10
ARMS = ("inproc_t1", "server_t1", "inproc_t2", "server_t2", "two_servers_t1")
DEFAULT_ARMS = ("inproc_t1", "server_t1", "server_t2", "two_servers_t1")
CFG, SAMPLER, SCHEDULER = 7.0, "euler", "normal"
SUBJECTS = ["a cat", "a dog", "a woman", "a man", "a horse", "a city street", "a mountain lake",
            "a bowl of fruit", "an old car", "a lighthouse"]
STYLES = ["photo", "oil painting", "watercolor", "sketch", "3d render"]


def out(s: str = "") -> None:
    sys.stdout.write(s + "\n")
    sys.stdout.flush()


def prompt_rows(n: int) -> list[tuple[str, int]]:
    return [(f"{STYLES[i // len(SUBJECTS) % len(STYLES)]} of {SUBJECTS[i % len(SUBJECTS)]}, variant {i}",
             1000 + i) for i in range(n)]


def workflow(ckpt_name: str, steps: int, size: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "warm-up prompt"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 1, "steps": steps, "cfg": CFG, "sampler_name": SAMPLER, "scheduler": SCHEDULER,
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "bench/img"}},
    }


# ------------------------------------------------------------------------------------------
# in-process worker (fresh process)
# ------------------------------------------------------------------------------------------

def worker_inproc(out_dir: str, threads: int, n: int, steps: int, size: int) -> None:
    import logging
    logging.disable(logging.WARNING)
    import torch
    torch.set_num_threads(threads)
    from tests.packload import comfy_ready
    comfy_ready()
    import comfy.sd
    import folder_paths
    import nodes

    from tools.tiny_models import ensure
    folder_paths.set_output_directory(os.path.join(out_dir, "comfy_output"))
    mp, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(ensure("sd1")), output_vae=True, output_clip=True,
        embedding_directory=folder_paths.get_folder_paths("embeddings"))
    enc, ks, dec, save = nodes.CLIPTextEncode(), nodes.KSampler(), nodes.VAEDecode(), nodes.SaveImage()
    rows = prompt_rows(n)
    per = []
    with torch.inference_mode():
        neg = enc.encode(clip, "")[0]
        lat = nodes.EmptyLatentImage().generate(size, size, 1)[0]

        def one(prompt: str, seed: int) -> None:
            pos = enc.encode(clip, prompt)[0]
            s = ks.sample(mp, seed, steps, CFG, SAMPLER, SCHEDULER, pos, neg, lat, denoise=1.0)[0]
            img = dec.decode(vae, s)[0]
            save.save_images(img, filename_prefix="bench/img")

        one("warm-up prompt", 1)
        t0, c0 = time.perf_counter(), time.process_time()
        for p, seed in rows:
            t = time.perf_counter()
            one(p, seed)
            per.append(time.perf_counter() - t)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    files = list(Path(out_dir, "comfy_output", "bench").glob("*.png"))
    Path(out_dir, "result.json").write_text(json.dumps({
        "wall_s": wall, "cpu_s": cpu, "per_prompt_s": per, "threads": torch.get_num_threads(),
        "images": len(files) - 1}))


def run_inproc(threads: int, a, tmp: Path) -> dict:
    d = tmp / f"inproc_t{threads}"
    d.mkdir(parents=True)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "inproc", "--out", str(d),
           "--threads", str(threads), "--prompts", str(a.prompts), "--steps", str(a.steps), "--size", str(a.size)]
    p = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=3600)
    rp = d / "result.json"
    if p.returncode != 0 or not rp.exists():
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
        raise SystemExit(f"in-process worker failed (exit {p.returncode})")
    r = json.loads(rp.read_text())
    if r["images"] != a.prompts:
        raise SystemExit(f"in-process worker saved {r['images']} images, expected {a.prompts}")
    return r


# ------------------------------------------------------------------------------------------
# server arms
# ------------------------------------------------------------------------------------------

def proc_cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def run_servers(n_servers: int, threads: int, a, tmp: Path, name: str) -> dict:
    from safegen_batch.results import read_jsonl
    from tools.comfy_host import ComfyServer
    from tools.tiny_models import ensure

    ckpt = Path(ensure("sd1"))
    wf = workflow(ckpt.name, a.steps, a.size)
    d = tmp / name
    d.mkdir(parents=True)
    wf_path, csv_path = d / "bench_api.json", d / "prompts.csv"
    wf_path.write_text(json.dumps(wf))
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "evaluation_seed", "evaluation_guidance"])
        for p, seed in prompt_rows(a.prompts):
            w.writerow([p, seed, CFG])
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    servers = [ComfyServer(d / f"host{i}", env=env) for i in range(n_servers)]
    try:
        for s in servers:
            (s.models_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            link = s.models_dir / "checkpoints" / ckpt.name
            if not link.exists():
                link.symlink_to(ckpt)
            s.start(timeout=300)
        for s in servers:  # warm-up: model loaded, kernels warm (a prompt not in the batch)
            s.run(wf, timeout=600)
        cpu0 = [proc_cpu_s(s.pid) for s in servers]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cmd = [sys.executable, "-m", "safegen_batch", "run", "--workflow", str(wf_path), "--prompts",
               str(csv_path), "--out", str(d / "run"), "--method", name, "--quiet",
               "--summary-json", str(d / "summary.json")]
        for s in servers:
            cmd += ["--server", s.url]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=3600,
                           env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu1 = [proc_cpu_s(s.pid) for s in servers]
        rss = [s.rss_bytes() for s in servers]
        if p.returncode != 0:
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
            raise SystemExit(f"batch runner failed (exit {p.returncode})")
        summary = json.loads((d / "summary.json").read_text())
        rows, bad = read_jsonl(d / "run" / "results.jsonl")
        ok = [r for r in rows if r.get("status") == "ok"]
        if len(ok) != a.prompts or bad or not all((d / "run" / r["images"][0]).is_file() for r in ok):
            raise SystemExit(f"{name}: {len(ok)} ok rows / {a.prompts}, {bad} unreadable lines")
        runner_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        exec_s = [r["exec_seconds"] for r in ok if r.get("exec_seconds")]
        return {"wall_s": wall, "runner_internal_s": summary["seconds"],
                "server_cpu_s": sum(c1 - c0 for c0, c1 in zip(cpu0, cpu1)), "runner_cpu_s": runner_cpu,
                "cpu_s": sum(c1 - c0 for c0, c1 in zip(cpu0, cpu1)) + runner_cpu,
                "per_server": summary["per_server"], "server_rss_mib": [r / 2**20 if r else None for r in rss],
                "threads": threads, "servers": n_servers, "images": len(ok),
                "median_exec_s": sorted(exec_s)[len(exec_s) // 2] if exec_s else None,
                "startup_s": [s.startup_seconds for s in servers]}
    finally:
        for s in servers:
            s.stop()


def run_arm(arm: str, a, tmp: Path, i: int) -> dict:
    load0 = loadavg()
    t = time.perf_counter()
    if arm.startswith("inproc"):
        r = run_inproc(int(arm[-1]), a, tmp / f"r{i}")
    elif arm.startswith("two_servers"):
        r = run_servers(2, 1, a, tmp / f"r{i}", arm)
    else:
        r = run_servers(1, int(arm[-1]), a, tmp / f"r{i}", arm)
    r["arm_wall_s"] = time.perf_counter() - t
    r["loadavg_1min"] = [load0, loadavg()]
    return r


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["inproc"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, default=50, help="prompts per arm (default 50)")
    ap.add_argument("--steps", type=int, default=20, help="euler steps (default 20)")
    ap.add_argument("--size", type=int, default=64, help="image side in px (default 64: 8x8 latents)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm, order rotated (default 2)")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                    help=f"comma-separated subset of {','.join(ARMS)} (default {','.join(DEFAULT_ARMS)}; "
                         "inproc_t2 gives the 2-thread overhead but takes long on a busy host)")
    ap.add_argument("--json", default=str(RESULTS))
    a = ap.parse_args(argv)
    if a.worker:
        worker_inproc(a.out, a.threads, a.prompts, a.steps, a.size)
        return 0
    arms = [x for x in a.arms.split(",") if x]
    if not set(arms) <= set(ARMS):
        ap.error(f"unknown arm in {a.arms}")

    from tools.tiny_models import ensure
    ensure("sd1")
    t_all = time.perf_counter()
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    jp = Path(a.json)
    jp.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="safegen_bench_batch_") as td:
        for i in range(a.repeats):
            k = i % len(arms)
            for arm in arms[k:] + arms[:k]:
                r = run_arm(arm, a, Path(td), i)
                runs[arm].append(r)
                sys.stderr.write(f"[{arm} {i + 1}/{a.repeats}] {r['wall_s']:.1f} s for {a.prompts} prompts "
                                 f"({a.prompts / r['wall_s']:.2f}/s), cpu {r['cpu_s']:.1f} s, load "
                                 f"{r['loadavg_1min'][0]:.1f}->{r['loadavg_1min'][1]:.1f}\n")
                jp.write_text(json.dumps({"benchmark": "batch", "partial": True, "args": vars(a),
                                          "runs": runs}, indent=1) + "\n")  # an abort keeps the runs so far

    best = {arm: min(runs[arm], key=lambda r: r["wall_s"]) for arm in arms}
    n = a.prompts

    def ratio(x, y, key="wall_s"):
        return best[x][key] / best[y][key] if x in best and y in best else None

    overhead = {"t1": ratio("server_t1", "inproc_t1"), "t2": ratio("server_t2", "inproc_t2")}
    overhead_internal = {"t1": (best["server_t1"]["runner_internal_s"] / best["inproc_t1"]["wall_s"])
                         if "server_t1" in best and "inproc_t1" in best else None}
    thr = {}
    if "two_servers_t1" in best:
        for base in ("server_t2", "server_t1"):
            if base in best:
                thr[f"two_servers_t1_vs_{base}"] = best[base]["wall_s"] / best["two_servers_t1"]["wall_s"]
    ok = overhead["t1"] is not None and overhead["t1"] <= TARGET_OVERHEAD

    out()
    out(f"Batch runner vs in-process -- tiny SD1, {a.size}x{a.size} px, {a.steps} {SAMPLER}/{SCHEDULER} steps, "
        f"cfg {CFG}, {n} distinct prompts/seeds, PNG saved; fastest of {a.repeats} run(s) per arm")
    hdr = (f"{'arm':15} {'servers':>7} {'threads':>7} {'wall s':>8} {'s/prompt':>9} {'prompts/s':>9} "
           f"{'cpu s/prompt':>12} {'runs (wall s)':>20}")
    out(hdr)
    out("-" * len(hdr))
    for arm in arms:
        r = best[arm]
        sv = r.get("servers", 0)
        th = r["threads"] if not arm.startswith("two") else "1+1"
        out(f"{arm:15} {sv or '-':>7} {th:>7} {r['wall_s']:8.2f} {r['wall_s'] / n:9.3f} {n / r['wall_s']:9.2f} "
            f"{r['cpu_s'] / n:12.3f} {', '.join('%.1f' % x['wall_s'] for x in runs[arm]):>20}")
    out("  server arms: wall = the `python -m safegen_batch run` subprocess from start to exit (runner start-up, "
        "HTTP, websocket, image download, PNG + fsync'ed JSONL); cpu = servers' + runner's CPU time")
    out()
    out("Targets:")
    if overhead["t1"] is not None:
        out(f"  overhead, server via batch runner / in-process, 1 torch thread: {overhead['t1']:.3f}x "
            f"<= {TARGET_OVERHEAD}  {'PASS' if ok else 'FAIL'}  (runner's own timer, without its start-up: "
            f"{overhead_internal['t1']:.3f}x; cpu {best['server_t1']['cpu_s'] / best['inproc_t1']['cpu_s']:.3f}x)")
    if overhead["t2"] is not None:
        out(f"  overhead, 2 torch threads: {overhead['t2']:.3f}x  (reported)")
    for k, v in thr.items():
        out(f"  throughput {k.replace('_vs_', ' vs ')}: {v:.3f}x  (reported)")
    if "two_servers_t1" in best:
        r = best["two_servers_t1"]
        out(f"    two servers: prompts per server {r['per_server']}; RSS per server "
            f"{', '.join(f'{x:.0f}' for x in r['server_rss_mib'] if x)} MiB"
            + (f" (one server, 2 threads: {best['server_t2']['server_rss_mib'][0]:.0f} MiB)"
               if "server_t2" in best and best["server_t2"]["server_rss_mib"][0] else ""))
    loads = [x for arm in arms for r in runs[arm] for x in r["loadavg_1min"]]
    note = load_note(loads, "wall-time ratios are noisy")
    if note:
        out(note)

    wall = time.perf_counter() - t_all
    import torch
    report = {
        "benchmark": "batch",
        "command": " ".join([".venv/bin/python benchmarks/bench_batch.py", *(argv or sys.argv[1:])]),
        "targets": {"overhead_max": TARGET_OVERHEAD},
        "config": {"prompts": n, "steps": a.steps, "size": a.size, "cfg": CFG, "sampler": SAMPLER,
                   "scheduler": SCHEDULER, "repeats": a.repeats, "runner_inflight": 2,
                   "threads": {"inproc_t1": 1, "server_t1": 1, "inproc_t2": 2, "server_t2": 2,
                               "two_servers_t1": "1 per server (OMP_NUM_THREADS=1)"}},
        "overhead": overhead, "overhead_runner_internal": overhead_internal, "throughput": thr,
        "pass": {"overhead_t1": ok}, "best": best, "runs": runs,
        "max_loadavg_1min": max(loads) if loads else None, "wall_seconds": wall,
        "host": {"python": platform.python_version(), "torch": torch.__version__,
                 "machine": platform.machine(), "cpus": os.cpu_count()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    jp.write_text(json.dumps(report, indent=1) + "\n")
    out(f"wrote {jp.relative_to(REPO) if jp.is_relative_to(REPO) else jp} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
