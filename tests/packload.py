"""Import ComfyUI and this pack in-process for tests (the server tests use tools/comfy_host.py).

ComfyUI is not a pip package: put .comfyui on sys.path, force CPU before comfy.model_management
is imported, add the torchvision placeholder only when no working torchvision exists, and
import the pack the way ComfyUI does (a package from the repo's __init__.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "safegen_pack"


def comfy_ready() -> None:
    """ComfyUI importable, CPU mode, torchvision placeholder only if needed (one implementation:
    tools.tiny_models.setup_comfy_import)."""
    from tools.tiny_models import setup_comfy_import
    setup_comfy_import()
    import comfy.model_management  # noqa: F401


def load_pack():
    """The pack as ComfyUI imports it; returns the package module."""
    comfy_ready()
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = mod
    spec.loader.exec_module(mod)
    return mod


def pack_module(name: str):
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")
