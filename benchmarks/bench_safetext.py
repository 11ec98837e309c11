"""Safe Text Encoder Trainer: training steps/s with the originals cached once (the node) vs a naive
loop that re-encodes the frozen original embeddings of each step's prompts every step.

Both arms run ``safegen_comfy.safetext.train_safetext`` on the tiny SD1 checkpoint's CLIP-L (full
size, random weights) with the same prompts, seed, λ, lr, layers and batch; the naive arm passes
``cache_originals=False``. Each arm runs in a fresh subprocess (``--runs`` times, interleaved,
medians); the timed part is the training loop only (model load excluded). Both arms must end with
the same trained deltas (max |diff| printed, tolerance 1e-5): same work, only the caching differs.

    .venv/bin/python benchmarks/bench_safetext.py [--steps 12] [--batch 4] [--runs 3] [--threads 1]

Writes benchmarks/results/safetext.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import workers  # noqa: E402


def out(s: str = "") -> None:
    sys.stdout.write(s + "\n")
    sys.stdout.flush()


def worker(arm: str, steps: str, batch: str, threads: str, kind: str, save: str) -> None:
    import logging
    logging.disable(logging.WARNING)
    from tests.packload import comfy_ready, pack_module
    comfy_ready()
    import torch

    import comfy.sd
    from tools.tiny_models import ensure
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    N, ST = pack_module("safegen_comfy.safetext"), pack_module("safegen_core.safetext")
    _, clip, _, *_ = comfy.sd.load_checkpoint_guess_config(str(ensure(kind)), output_model=False,
                                                           output_vae=False, output_clip=True, embedding_directory=[])
    U, S = ST.default_unsafe_prompts(), ST.default_safe_prompts()
    with torch.inference_mode():
        t0 = time.perf_counter()
        res, *_ = N.train_safetext(clip, U, S, lam=1.0, steps=int(steps), lr=1e-4, batch_size=int(batch), seed=0,
                                   cache_originals=(arm == "cached"))
        dt = time.perf_counter() - t0
    torch.save({k: v.clone() for k, v in res.params.items()}, save)
    workers.emit({"arm": arm, "seconds": dt, "steps": int(steps), "steps_per_s": int(steps) / dt,
                  "threads": torch.get_num_threads(), "prompts": [len(U), len(S)]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4, help="unsafe and safe prompts per step (each)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kind", default="sd1", choices=("sd1", "sdxl"))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "safetext.json"))
    a = ap.parse_args()
    import torch
    t_start = time.perf_counter()
    res = {"cached": [], "naive": []}
    diffs = []
    with tempfile.TemporaryDirectory(prefix="safegen_bench_st_") as td:
        for i in range(a.runs):
            saved = {}
            for arm in ("naive", "cached"):
                path = os.path.join(td, f"{arm}_{i}.pt")
                res[arm].append(workers.run_worker(__file__, arm, a.steps, a.batch, a.threads, a.kind, path,
                                                   timeout=1800))
                saved[arm] = torch.load(path, weights_only=True)
            diffs.append(max(float((saved["naive"][k] - saved["cached"][k]).abs().max()) for k in saved["cached"]))
    med = {arm: statistics.median(r["steps_per_s"] for r in rs) for arm, rs in res.items()}
    ratio = med["cached"] / med["naive"]
    r0 = res["cached"][0]
    out(f"Safe Text Encoder Trainer, tiny {a.kind} CLIP (full-size random weights), {a.steps} steps, "
        f"{a.batch}+{a.batch} prompts/step, {r0['prompts'][0]}+{r0['prompts'][1]} prompts, "
        f"{r0['threads']} torch thread(s), {a.runs} fresh-process runs per arm, medians")
    for arm in ("naive", "cached"):
        runs = ", ".join(f"{r['steps_per_s']:.3f}" for r in res[arm])
        out(f"  {arm:6}: {med[arm]:.3f} steps/s  (runs: {runs})")
    out(f"  speed-up cached / naive: {ratio:.2f}x   max |delta_cached - delta_naive| = {max(diffs):.1e} "
        f"({'same work' if max(diffs) <= 1e-5 else 'MISMATCH'})")
    wall = time.perf_counter() - t_start
    report = {"benchmark": "safetext", "config": {**vars(a), "python": platform.python_version(),
                                                   "torch": torch.__version__, "cpus": os.cpu_count()},
              "steps_per_s": med, "speedup": ratio, "max_abs_diff": max(diffs), "runs": res, "wall_seconds": wall,
              "loadavg": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(a.json).write_text(json.dumps(report, indent=1))
    jp = Path(a.json).resolve()
    out(f"wrote {jp.relative_to(REPO) if jp.is_relative_to(REPO) else jp} (wall {wall:.0f} s)")
    return 0 if max(diffs) <= 1e-5 else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:8])
    else:
        sys.exit(main())
