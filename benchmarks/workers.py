"""Fresh-process benchmark arms: a worker prints one ``RESULT {json}`` line, the driver reads it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "RESULT "


def emit(result: dict) -> None:
    """In a worker: hand ``result`` to the driver."""
    sys.stdout.write(PREFIX + json.dumps(result) + "\n")


def run_worker(script: str, *args, timeout: float = 300) -> dict:
    """Run ``script --worker *args`` in a fresh Python (clean RSS, no warm caches); its RESULT dict."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, script, "--worker", *map(str, args)], cwd=str(REPO), env=env,
                       capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(PREFIX)]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker {args[0] if args else ''} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n"
                           f"{p.stderr[-4000:]}")
    return json.loads(lines[-1][len(PREFIX):])


def loadavg() -> float:
    """The host's 1-minute load average (NaN where /proc/loadavg is missing)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def load_note(loads: list[float], what: str) -> str | None:
    """A warning when the load average seen during the runs exceeded the CPU count; ``what`` says
    which numbers that makes noisy."""
    ncpu = os.cpu_count() or 1
    if loads and max(loads) > ncpu:
        return (f"NOTE: the 1-min load average reached {max(loads):.1f} on {ncpu} CPUs: other jobs competed "
                f"for the cores; {what}")
    return None
