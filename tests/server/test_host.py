"""The harness (tools/comfy_host.py) against a real ComfyUI server; no models needed."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from tools.comfy_host import (PLACEHOLDER_STUBS, REPO_ROOT, ExecutionError, PromptError, RunResult,
                              find_working)


def empty_image_graph(width=64, height=64, color=0x3366CC, prefix="host_test"):
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": height, "batch_size": 1, "color": color}},
        "2": {"class_type": "SaveImage",
              "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def rgb(color: int) -> tuple[int, int, int]:
    return ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)


def assert_solid(img, size, color):
    assert img.size == size
    img = img.convert("RGB")
    extrema = img.getextrema()  # per channel (min, max)
    assert [lo for lo, _ in extrema] == list(rgb(color))
    assert [hi for _, hi in extrema] == list(rgb(color))


def test_object_info_lists_stock_nodes(comfy_server):
    info = comfy_server.object_info()
    for name in ("EmptyImage", "SaveImage", "CheckpointLoaderSimple", "CLIPTextEncode",
                 "KSampler", "VAEDecode", "EmptyLatentImage"):
        assert name in info, name
    assert len(info) > 300
    assert info["EmptyImage"]["input"]["required"]["width"][0] == "INT"


def test_pack_imports_cleanly(comfy_server):
    if not (REPO_ROOT / "__init__.py").exists():
        pytest.skip("repo has no __init__.py yet")
    # "Cannot import" also appears for stock comfy_extras (audio nodes: no torchaudio here),
    # so only failures of custom_nodes/safegen count.
    err = comfy_server.pack_import_error("safegen")
    assert err is None, f"safegen pack failed to import:\n{err}"
    assert "(IMPORT FAILED)" not in "\n".join(
        ln for ln in comfy_server.log_text().splitlines() if "custom_nodes/safegen" in ln)


def test_empty_image_to_save_image(comfy_server):
    color = 0x3366CC
    res = comfy_server.run(empty_image_graph(64, 64, color), timeout=120)
    assert isinstance(res, RunResult)
    types = res.event_types()
    assert types.index("execution_start") < types.index("execution_success")
    assert "execution_error" not in types
    assert res.status.get("status_str") == "success"
    assert set(res.outputs) == {"2"}
    refs = res.ui("2")["images"]
    assert len(refs) == 1 and refs[0]["type"] == "output"
    imgs = res.images()
    assert len(imgs) == 1
    assert_solid(imgs[0], (64, 64), color)
    assert (comfy_server.output_dir / refs[0]["subfolder"] / refs[0]["filename"]).is_file()


def test_non_square_size_and_other_colour(comfy_server):
    color = 0xFF8000
    res = comfy_server.run(empty_image_graph(80, 48, color, prefix="host_test_b"), timeout=120)
    assert_solid(res.images("2")[0], (80, 48), color)


def test_invalid_input_raises_prompt_error_naming_node(comfy_server):
    graph = empty_image_graph()
    graph["1"]["inputs"]["width"] = 0  # min is 1
    with pytest.raises(PromptError) as ei:
        comfy_server.run(graph, timeout=60)
    err = ei.value
    assert err.status == 400
    assert "1" in err.node_errors, err.body
    assert err.node_errors["1"]["class_type"] == "EmptyImage"
    msgs = err.messages("1")
    assert msgs and any("width" in m for m in msgs), msgs
    assert "node 1 (EmptyImage)" in str(err)


def test_unknown_node_type_is_rejected(comfy_server):
    graph = empty_image_graph()
    graph["1"]["class_type"] = "NoSuchNode_" + uuid.uuid4().hex[:6]
    with pytest.raises(PromptError) as ei:
        comfy_server.queue(graph)
    assert "NoSuchNode_" in str(ei.value.body)


def test_new_model_file_visible_without_restart_and_execution_error(comfy_server):
    """folder_paths caches file lists but re-lists when a folder's mtime changes: a file
    written after start-up is accepted by validation. Loading junk gives ExecutionError."""
    before = comfy_server.object_info("CheckpointLoaderSimple")  # primes the list cache
    names_before = before["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    name = f"junk_{uuid.uuid4().hex[:8]}.safetensors"
    assert name not in names_before
    (comfy_server.models_dir / "checkpoints" / name).write_bytes(b"\x00" * 64)
    after = comfy_server.object_info("CheckpointLoaderSimple")
    assert name in after["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]

    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
        "2": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }
    with pytest.raises(ExecutionError) as ei:  # validation passed: it ran and failed
        comfy_server.run(graph, timeout=120)
    err = ei.value
    assert err.node_id == "1"
    assert err.node_type == "CheckpointLoaderSimple"
    assert err.exception_message
    assert err.traceback.strip()
    assert err.prompt_id and comfy_server.history(err.prompt_id)["status"]["status_str"] == "error"


def test_server_keeps_serving_after_errors(comfy_server):
    bad = empty_image_graph()
    bad["2"]["inputs"]["images"] = ["99", 0]  # link to a missing node
    with pytest.raises(PromptError):
        comfy_server.queue(bad)
    comfy_server.interrupt()  # nothing running: a no-op
    comfy_server.free(unload_models=True, free_memory=True)
    color = 0x10E020
    res = comfy_server.run(empty_image_graph(32, 40, color, prefix="host_test_c"), timeout=120)
    assert_solid(res.images()[0], (32, 40), color)
    assert comfy_server.is_running()
    assert comfy_server.system_stats()["system"]["comfyui_version"]


# Run with only the placeholder on the path: every submodule imports, attributes resolve, a
# subclass can be defined, and every call raises a RuntimeError that names the package.
_PLACEHOLDER_PROBE = """
import importlib, sys
name = sys.argv[1]
top = importlib.import_module(name)
assert top.__placeholder__ is True and top.__file__.startswith(sys.argv[2]), top
sub = importlib.import_module(name + ".functional.some.deep_module")
from_import = getattr(importlib.import_module(name), "transforms")
assert type(from_import).__name__ == "_PlaceholderModule", from_import
const = sub.SomeClass.SOME_CONSTANT
class Sub(sub.SomeClass):
    pass
for what, call in [("function", lambda: sub.resample(1, 2, 3)), ("attribute", lambda: const()),
                   ("subclass", lambda: Sub()), ("module", lambda: sub())]:
    try:
        call()
    except RuntimeError as e:
        assert f"{name} placeholder" in str(e) and f"install a real {name}" in str(e), (what, e)
    else:
        raise AssertionError(f"calling a {what} of the {name} placeholder did not raise")
print("ok")
"""


@pytest.mark.parametrize("name", sorted(PLACEHOLDER_STUBS))
def test_placeholder_is_import_only(comfy_server, name):
    stub = str(PLACEHOLDER_STUBS[name])
    env = dict(os.environ, PYTHONPATH=stub)
    p = subprocess.run([str(comfy_server.python), "-c", _PLACEHOLDER_PROBE, name, stub], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


def test_placeholders_only_without_a_working_package(comfy_server):
    """Each placeholder is on the server's path exactly when its interpreter has no working real
    package; with them, no stock module fails for want of torchvision/torchaudio (ComfyUI >= 0.20
    cannot even start without torchaudio: comfy/sd.py imports it)."""
    for name in PLACEHOLDER_STUBS:
        assert comfy_server.used_stubs[name] == (not find_working(name, str(comfy_server.python))), name
    log = comfy_server.log_text()
    for name in PLACEHOLDER_STUBS:
        assert f"No module named '{name}" not in log, name
