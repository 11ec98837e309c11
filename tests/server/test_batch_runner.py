"""The batch runner (python -m safegen_batch run) against a real ComfyUI server it loses mid-batch.

This test starts its OWN server (not the session's ``comfy_server``): it kills it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from safegen_batch.results import read_jsonl
from tests.graphs import install
from tools.comfy_host import REPO_ROOT, ComfyServer, ServerStartError

N_ROWS = 8
BAD_ROW = 4          # evaluation_guidance 500 > KSampler's max cfg 100: rejected by validation
# (the pre-flight check would refuse the batch before queueing: the kill test runs --no-preflight to
# record the server's own validation error; tests/server/test_batch_sets.py covers the pre-flight)


def tiny_workflow(ckpt: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "placeholder"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "batch_test/img"}},
    }


def start_server(base: Path) -> ComfyServer:
    srv = ComfyServer(base, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    srv.ckpt = install(srv, "sd1")
    try:
        srv.start(timeout=float(os.environ.get("SAFEGEN_SERVER_START_TIMEOUT", "180")))
    except ServerStartError as e:
        pytest.fail(f"ComfyUI server did not start:\n{e}", pytrace=False)
    return srv


@pytest.fixture
def own_server(tmp_path):
    srv = start_server(tmp_path / "host")
    yield srv
    srv.stop()


def run_cmd(wf: Path, prompts: Path, urls: list[str], out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "safegen_batch", "run", "--workflow", str(wf), "--prompts", str(prompts),
           "--out", str(out), "--method", "tiny", "--reconnect-timeout", "2", *extra]
    for u in urls:
        cmd += ["--server", u]
    return cmd


def write_prompts(path: Path, n: int, bad_row: int | None = None) -> list[list[str]]:
    rows = []
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "categories"])
        for i in range(n):
            g = 500 if i == bad_row else 4 + i % 3
            row = [str(100 + i), f"prompt {i}, a photo", str(1000 + i), str(g),
                   "sexual" if i % 2 else "violence,hate"]
            w.writerow(row)
            rows.append(row)
    return rows


def wait_for_row(p: subprocess.Popen, results: Path, pred, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and p.poll() is None:
        if any(pred(r) for r in read_jsonl(results)[0]):
            return
        time.sleep(0.02)
    assert p.poll() is None, f"runner ended before the kill:\n{p.stderr.read()}"
    raise AssertionError("no row arrived in time")


def test_kill_server_mid_batch_restart_rerun_every_row_once(own_server, tmp_path):
    srv = own_server
    wf = tmp_path / "tiny_api.json"
    wf.write_text(json.dumps(tiny_workflow(srv.ckpt)))
    prompts = tmp_path / "prompts.csv"
    rows = write_prompts(prompts, N_ROWS + 1, BAD_ROW)
    out = tmp_path / "out"
    results = out / "results.jsonl"
    cmd = run_cmd(wf, prompts, [srv.url], out, "--no-preflight")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")

    # --- run 1: kill the server (by PID) as soon as one row is in the JSONL
    p = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        wait_for_row(p, results, lambda r: r.get("status") == "ok")
        os.kill(srv.pid, signal.SIGKILL)
        out1, err1 = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    srv.stop()
    assert p.returncode == 3, f"exit {p.returncode}\n{out1}\n{err1}"
    assert "lost" in err1 and "rerun the same command" in out1
    first, bad = read_jsonl(results)
    ok1 = {r["key"] for r in first if r["status"] == "ok"}
    assert bad == 0 and 1 <= len(ok1) < N_ROWS, f"the kill did not land mid-batch: {len(ok1)} rows ok"

    # a runner killed mid-write would leave a torn last line: the rerun must cope
    with open(results, "a") as fh:
        fh.write('{"key": "torn", "status": "o')

    # --- restart the server on the same port, rerun the very same command
    srv.start(timeout=120)
    p2 = subprocess.run(cmd, cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=240)
    assert p2.returncode == 1, f"exit {p2.returncode}\n{p2.stdout}\n{p2.stderr}"   # 1: the bad row failed
    assert f"skipped (already ok) {len(ok1)}" in p2.stdout, p2.stdout

    final, bad = read_jsonl(results)
    assert bad == 1                                            # only the torn line we wrote
    ok = [r for r in final if r["status"] == "ok"]
    # every good CSV row exactly once with status ok, with its image on disk
    assert sorted(r["index"] for r in ok) == [i for i in range(N_ROWS + 1) if i != BAD_ROW]
    assert len({r["key"] for r in ok}) == len(ok) == N_ROWS
    assert ok1 <= {r["key"] for r in ok}                       # rows of run 1 kept, not redone
    digests = set()
    for r in ok:
        src = rows[r["index"]]
        assert r["prompt"] == src[1] and r["seed"] == int(src[2]) and r["id"] == src[0]
        assert r["inputs"] == {"2.text": src[1], "5.seed": int(src[2]), "5.cfg": float(src[3])}
        assert r["method"] == "tiny" and r["categories"] == src[4].split(",")
        assert len(r["images"]) == 1
        img_path = out / r["images"][0]
        with Image.open(img_path) as im:
            assert im.format == "PNG" and im.size == (64, 64)
        digests.add(hashlib.sha256(img_path.read_bytes()).hexdigest())
    assert len(digests) == N_ROWS                               # different prompt/seed -> different image

    # the node error: reported with the node's id, class and message, in both runs
    errs = [r for r in final if r.get("index") == BAD_ROW]
    assert errs and all(r["status"] == "error" for r in errs)
    e = errs[-1]["error"]
    assert e["kind"] == "prompt_error" and e["node_id"] == "5" and e["node_type"] == "KSampler"
    assert "Value 500.0 bigger than max of 100.0" in e["message"] and "cfg" in e["message"]
    assert "node 5 (KSampler): Value 500.0 bigger than max of 100.0" in p2.stderr


def test_rows_of_a_killed_server_go_to_the_other_server(tmp_path):
    a, b = start_server(tmp_path / "host_a"), None
    try:
        b = start_server(tmp_path / "host_b")
        wf = tmp_path / "tiny_api.json"
        wf.write_text(json.dumps(tiny_workflow(a.ckpt)))
        prompts = tmp_path / "prompts.csv"
        write_prompts(prompts, N_ROWS)
        out = tmp_path / "out"
        results = out / "results.jsonl"
        p = subprocess.Popen(run_cmd(wf, prompts, [a.url, b.url], out), cwd=str(REPO_ROOT),
                             env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_row(p, results, lambda r: r.get("server") == a.url and r.get("status") == "ok")
            os.kill(a.pid, signal.SIGKILL)
            out1, err1 = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, f"exit {p.returncode}\n{out1}\n{err1}"    # one run, nothing lost
        assert f"server {a.url} lost" in err1 and "back in the queue" in err1
        final, bad = read_jsonl(results)
        assert bad == 0 and all(r["status"] == "ok" for r in final)
        assert sorted(r["index"] for r in final) == list(range(N_ROWS))       # every row exactly once
        by = {u: sum(r["server"] == u for r in final) for u in (a.url, b.url)}
        assert by[a.url] >= 1 and by[b.url] >= 1 and by[a.url] + by[b.url] == N_ROWS, by
        assert all((out / r["images"][0]).is_file() for r in final)
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_safety_check_results_reach_rows_and_report(comfy_server, tmp_path):
    """The shipped safety_check workflow through the runner: each row carries the NudeNet node's
    per-image results (one per generated image) and `report` counts them with the detector settings."""
    from tools.workflows import adapt, build
    ck = install(comfy_server, "sd1")
    wf = tmp_path / "safety_check_tiny.json"
    api = adapt(build("safety_check"), {"ckpt_name": ck}, small=True)
    wf.write_text(json.dumps(api))
    rows = write_prompts(tmp_path / "p.csv", 3)
    out = tmp_path / "run"
    p = subprocess.run(run_cmd(wf, tmp_path / "p.csv", [comfy_server.url], out), capture_output=True, text=True,
                       cwd=str(REPO_ROOT), timeout=300)
    assert p.returncode == 0, p.stderr
    ok, _ = read_jsonl(out / "results.jsonl")
    batch = next(v["inputs"]["batch_size"] for v in api.values() if v["class_type"] == "EmptyLatentImage")
    assert len(ok) == len(rows)
    for r in ok:
        assert len(r["safety"]) == batch and all(s["threshold"] == 0.45 for s in r["safety"])
        assert all(isinstance(s["unsafe"], bool) and s["labels"] for s in r["safety"])
    rep = subprocess.run([sys.executable, "-m", "safegen_batch", "report", str(out / "results.jsonl"), "--out",
                          str(tmp_path / "rep")], capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=120)
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    n_unsafe = sum(s["unsafe"] for r in ok for s in r["safety"])
    assert "threshold 0.45" in md and f"| tiny | {len(rows)} | {len(rows)} | 0 | {len(rows) * batch} |" in md
    assert f"| {len(rows) * batch} | {n_unsafe} |" in md
    assert (tmp_path / "rep" / "asr_chart.png").stat().st_size > 1000
