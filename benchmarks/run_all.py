"""Run every benchmarks/bench_*.py in turn (each prints its own ratios and writes results/*.json)."""
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
rc = 0
for b in sorted(here.glob("bench_*.py")):
    print(f"== {b.name}", flush=True)  # noqa: T201
    rc |= subprocess.call([sys.executable, str(b)], cwd=here.parent)
sys.exit(rc)
