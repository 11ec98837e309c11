"""tools/gpu_smoke.py --dry-run --model sdxl: every SafeGen node once through its own ComfyUI server
(--cpu), on the tiny SDXL checkpoint (CLIP-L + CLIP-G; SD1 is what the rest of the server suite runs).

Runs the script as a subprocess (it starts and stops its own server; the session's comfy_server
is not used) and checks its output: exit 0, one ``PASS <node>  (<s> s)`` line per SafeGen node,
the code-path lines (ComfyUI version, device, ModelPatcherDynamic, contract check, the trainable-
model path of each training node read from the server log) and the ``12 passed, 0 failed`` total;
the --json report must say the same. On 2 busy CPU cores the run takes ~2-3 minutes.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tools.comfy_host import REPO_ROOT
from tools.gpu_smoke import NODE_IDS, TRAINING_NODES

TRAINABLE_PATHS = {"fresh copy", "shared weights"}


@pytest.mark.sdxl
def test_dry_run_passes_every_node_and_reports_the_code_path(tmp_path):
    out_json = tmp_path / "smoke.json"
    p = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "gpu_smoke.py"), "--dry-run", "--model", "sdxl",
                        "--json", str(out_json)],
                       cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=840)
    out = p.stdout
    detail = f"exit {p.returncode}\n--- stdout\n{out}\n--- stderr (tail)\n{p.stderr[-3000:]}"
    assert p.returncode == 0, detail
    lines = out.splitlines()

    assert len(NODE_IDS) == 12 and all(n.startswith("SafeGen_") for n in NODE_IDS)
    for node in NODE_IDS:
        assert any(re.fullmatch(rf"PASS {node}  \(\d+\.\d s\)", ln) for ln in lines), \
            f"no PASS line for {node}\n{detail}"
    assert not any(ln.startswith("FAIL ") for ln in lines), detail
    assert lines[-1] == "12 passed, 0 failed", detail

    # the code path, printed before the nodes
    first_node = next(i for i, ln in enumerate(lines) if ln.startswith(("PASS ", "FAIL ")))
    header = "\n".join(lines[:first_node])
    assert re.search(r"^ComfyUI version: \d+\.\d+\.\d+", header, re.M), detail
    assert re.search(r"^device: cpu \(cpu\)$", header, re.M), detail  # --dry-run starts with --cpu
    assert re.search(r"^ModelPatcherDynamic: (yes|no)  \(CheckpointLoaderSimple MODEL is [\w.]+\)$", header,
                     re.M), detail
    assert re.search(r"^contract check: OK \(\d+ internals present on ComfyUI ", header, re.M), detail
    # after each training node: the path the server logged ("SafeGen training on ...")
    for node in TRAINING_NODES:
        i = lines.index(next(ln for ln in lines if ln.startswith(f"PASS {node} ")))
        m = re.fullmatch(r"    trainable-model path: (.+?)  \(server log: SafeGen training on (.+)\)",
                         lines[i + 1])
        assert m, f"{node}: no trainable-model path line\n{detail}"
        assert set(m.group(1).split(" + ")) <= TRAINABLE_PATHS, lines[i + 1]
    assert re.search(r"^code path: ModelPatcherDynamic (yes|no); trainable-model path .+ "
                     r"\(4/4 training nodes", out, re.M), detail

    report = json.loads(out_json.read_text())
    assert report["dry_run"] is True and report["passed"] == 12 and report["failed"] == 0
    assert report["model"] == "sdxl"
    assert sorted(r["node"] for r in report["nodes"]) == sorted(NODE_IDS)
    assert sorted(report["loaded_nodes"]) == sorted(NODE_IDS)
    assert report["contract"] == []
    for node in TRAINING_NODES:
        assert report["trainable_paths"][node] and set(report["trainable_paths"][node]) <= TRAINABLE_PATHS
