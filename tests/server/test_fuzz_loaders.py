"""Fuzzing the three file loaders through a real ComfyUI server (POST /prompt).

``tests/fuzz_files.py`` makes N malformed files (seeded; N = ``SAFEGEN_FUZZ_CASES``, default 1050, a
third per loader): Unlearned UNet Loader, Load Implicit Negative Embedding, Safe Text Encoder. Each
goes into the server's model folder and through its node in its own prompt (all queued at once,
then read back from /history). Asserts, per case: the prompt ended in an execution error of that
node whose message names the file *with its extension* (no silent accept, no unnamed error); and
overall: the server still serves, no pickle payload ever ran, the server's RSS grew by less than
``RSS_GROWTH_MAX``. The totals are printed and recorded (``record_property``).
"""
from __future__ import annotations

import os
import time
from collections import Counter

from tests.fuzz_files import FOLDERS, generate
from tests.graphs import Graph, install

N_CASES = int(os.environ.get("SAFEGEN_FUZZ_CASES", "1050"))
SEED = int(os.environ.get("SAFEGEN_FUZZ_SEED", "0"))
RSS_GROWTH_MAX = 1.5 * 2 ** 30


def graph_for(target: str, ck: str, file_name: str) -> dict:
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    if target == "unet":
        n = g.add("SafeGen_UnlearnedUNetLoader", model=c[0], unet_name=file_name, strength=1.0)
        g.add("PreviewAny", source=n[1])
    elif target == "embedding":
        n = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=c[1], embedding_name=file_name, text="{}",
                  strength=1.0)
        g.add("PreviewAny", source=n[1])
    else:
        n = g.add("SafeGen_SafeTextEncoder", clip=c[1], file=file_name, strength=1.0, text="a cat")
        g.add("PreviewAny", source=n[1])
    return dict(g)


def outcome(entry: dict) -> tuple[str, str, str]:
    """(status, node type, message) of a /history entry."""
    st = entry.get("status", {})
    for kind, data in st.get("messages", []):
        if kind == "execution_error":
            return "error", data.get("node_type", ""), str(data.get("exception_message", ""))
    return st.get("status_str", "?"), "", ""


def test_fuzzed_files_are_refused_naming_the_file(comfy_server, tmp_path, record_property):
    srv = comfy_server
    ck = install(srv, "sd1")
    markers = tmp_path / "markers"
    markers.mkdir()
    cases = list(generate(N_CASES, SEED, str(markers)))
    for c in cases:
        d = srv.models_dir / FOLDERS[c.target]
        d.mkdir(parents=True, exist_ok=True)
        (d / c.file_name).write_bytes(c.data)
    # controls: the unmutated file of each target loads (the oracle is not vacuous)
    import torch
    from safetensors.torch import save

    from tests.fuzz_files import base_tensors, load_sd1
    sd1 = load_sd1()
    for target in FOLDERS:
        tensors, meta = base_tensors(target, torch.Generator().manual_seed(1), sd1)
        name = f"fz_control_{target}.safetensors"
        (srv.models_dir / FOLDERS[target] / name).write_bytes(save(tensors, metadata=meta))
        r = srv.run(graph_for(target, ck, name), timeout=300)
        assert r.status.get("status_str") == "success", (target, r.status)
    rss0 = srv.rss_bytes() or 0
    t0 = time.monotonic()
    queued, refused_at_validation = [], []
    for c in cases:
        try:
            queued.append((c, srv.client.queue(graph_for(c.target, ck, c.file_name))))
        except Exception as e:  # noqa: BLE001 - a validation error is a finding, reported below
            refused_at_validation.append((c, f"{type(e).__name__}: {e}"))
    results = []
    deadline = time.monotonic() + 900
    for c, pid in queued:
        entry = {}
        while not entry and time.monotonic() < deadline:
            entry = srv.client.history(pid)
            if not entry:
                time.sleep(0.05)
        results.append((c, outcome(entry) if entry else ("timeout", "", "")))
    elapsed = time.monotonic() - t0
    rss1 = srv.rss_bytes() or 0
    node_of = {"unet": "SafeGen_UnlearnedUNetLoader", "embedding": "SafeGen_LoadImplicitNegativeEmbedding",
               "text": "SafeGen_SafeTextEncoder"}
    silent = [(c.kind, c.file_name) for c, (s, _, _) in results if s == "success"]
    unnamed = [(c.kind, c.file_name, m[:200]) for c, (s, nt, m) in results
               if s == "error" and (c.file_name not in m or nt != node_of[c.target])]
    other = [(c.kind, c.file_name, s) for c, (s, _, _) in results if s not in ("success", "error")]
    ran = sorted(p.name for p in markers.iterdir())
    totals = {"cases": len(cases), "per_loader": dict(Counter(c.target for c in cases)),
              "kinds": len({(c.target, c.kind) for c in cases}), "refused_with_file_named":
              len(results) - len(silent) - len(unnamed) - len(other), "silent_accepts": len(silent),
              "unnamed_errors": len(unnamed), "validation_refusals": len(refused_at_validation),
              "timeouts_or_other": len(other), "pickle_payloads_run": len(ran), "crashes": 0 if srv.is_running else 1,
              "seconds": round(elapsed, 1), "rss_growth_mib": round((rss1 - rss0) / 2 ** 20, 1)}
    for k, v in totals.items():
        record_property(k, v)
    print(f"\nfuzz totals: {totals}")  # noqa: T201 - the closing note quotes it
    assert srv.is_running
    g = Graph()
    g.add("SaveImage", images=g.add("EmptyImage", width=8, height=8, batch_size=1, color=0)[0],
          filename_prefix="safegen_test/fuzz_alive")
    assert srv.run(g, timeout=60).status.get("status_str") == "success"
    assert not ran, f"pickle payloads ran: {ran}"
    assert not refused_at_validation, refused_at_validation[:5]
    assert not silent, f"{len(silent)} malformed file(s) accepted: {silent[:10]}"
    assert not unnamed, f"{len(unnamed)} error(s) not naming the file: {unnamed[:10]}"
    assert not other, other[:5]
    assert rss1 - rss0 < RSS_GROWTH_MAX, totals
    assert len(cases) >= 1000 or N_CASES < 1000
