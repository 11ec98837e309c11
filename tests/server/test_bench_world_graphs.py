"""The miniature-world benchmark's graphs (benchmarks/bench_world.py) against the real server's
node schemas: every node exists, every input it sets is declared, every required input is set,
and every fixed choice (variant, preset, sampler, objective, layers...) is one the node offers.

The benchmark itself takes ~20 min; this catches a renamed input or option in seconds.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FILE_INPUTS = {"ckpt_name", "unet_name", "embedding_name", "file"}  # lists of files on disk


def _bench():
    path = REPO / "benchmarks" / "bench_world.py"
    spec = importlib.util.spec_from_file_location("bench_world_graphs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _options(spec) -> list | None:
    kind, extra = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return extra.get("options")
    return None


@pytest.fixture(scope="module")
def graphs():
    bw = _bench()
    files = {w: f"{stem}.safetensors" for w, (_, stem) in bw.FILES.items()}
    out = {f"train:{w}": bw.training_graph(w, "world.safetensors", bw.CONCEPT_TEXT, files) for w in bw.FILES}
    for arm in bw.ARMS + bw.CONTROL_ARMS:
        for svf in ((True, False) if "safree" in arm else (True,)):
            g, _ = bw.arm_graph(arm, "world.safetensors", ["a red star on a grey background"], 0,
                                bw.CONCEPT_TEXT, files, safree_svf=svf)
            out[f"{arm} svf={svf}"] = g
    return out


def test_bench_world_graphs_match_the_servers_node_schemas(comfy_server, graphs):
    info = comfy_server.object_info()
    problems = []
    for name, g in graphs.items():
        for nid, node in g.items():
            cls = node["class_type"]
            if cls not in info:
                problems.append(f"{name}: node {nid} {cls} is not registered")
                continue
            spec = info[cls]["input"]
            declared = {**spec.get("required", {}), **spec.get("optional", {})}
            for key, value in node["inputs"].items():
                if key not in declared:
                    problems.append(f"{name}: {cls}.{key} is not an input of the node")
                    continue
                opts = _options(declared[key])
                if opts and key not in FILE_INPUTS and not isinstance(value, list) and value not in opts:
                    problems.append(f"{name}: {cls}.{key}={value!r} not in {opts}")
            for key in spec.get("required", {}):
                if key not in node["inputs"]:
                    problems.append(f"{name}: {cls}.{key} (required) is not set")
    assert not problems, "\n".join(problems)
    assert len(graphs) == 5 + 12 + 2  # every training graph, every arm, SAFREE with and without its filter
