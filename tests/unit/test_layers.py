"""The house's layers (docs/architecture.md), read from the source with ``ast``:

safegen_core (math, no ComfyUI) → safegen_comfy (runtime; ComfyUI internals only in compat.py) → nodes
(schemas; only the runtime layer and comfy_api; no node module imports another).
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY_TOP = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "node_helpers", "nodes",
             "server", "execution", "latent_preview", "comfyui_version"}
PUBLIC_FOR_RUNTIME = {"comfy.model_management", "comfy.sample", "comfy.utils", "folder_paths", "comfy_api.latest"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(relative level, dotted name) of every import in a file (``from . import x`` → (1, 'x'))."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and not base:
                out += [(node.level, a.name) for a in node.names]
            else:
                out.append((node.level, base))
    return out


def files(pkg: str) -> list[Path]:
    found = sorted((REPO / pkg).glob("*.py"))
    assert found, pkg
    return found


def test_core_imports_no_comfyui_and_no_other_layer():
    bad = [(f.name, lvl, n) for f in files("safegen_core") for lvl, n in imports(f)
           if (lvl == 0 and n.split(".")[0] in COMFY_TOP) or lvl >= 2]
    assert bad == []


def test_node_modules_import_only_the_runtime_layer_and_comfy_api():
    bad = []
    for f in files("nodes"):
        for lvl, n in imports(f):
            if lvl == 0 and n.split(".")[0] not in COMFY_TOP:
                continue  # stdlib (importlib, logging in __init__)
            ok = (lvl == 0 and n.startswith("comfy_api.latest")) or (lvl == 2 and n.split(".")[0] == "safegen_comfy") \
                or (f.name == "__init__.py" and lvl == 0 and n == "__future__")
            if n == "__future__":
                ok = True
            if not ok:
                bad.append((f.name, lvl, n))
    assert bad == []


def test_no_node_module_imports_another():
    bad = [(f.name, n) for f in files("nodes") if f.name != "__init__.py" for lvl, n in imports(f) if lvl == 1]
    assert bad == []


def test_runtime_layer_uses_only_public_comfyui_outside_the_seam():
    bad = []
    for f in files("safegen_comfy"):
        if f.name == "compat.py":
            continue
        for lvl, n in imports(f):
            if lvl == 0 and n.split(".")[0] in COMFY_TOP and n not in PUBLIC_FOR_RUNTIME:
                bad.append((f.name, n))
            if lvl == 2 and n.split(".")[0] == "nodes":
                bad.append((f.name, n))
    assert bad == []


@pytest.mark.parametrize("pkg", ["safegen_core", "safegen_comfy", "nodes"])
def test_no_one_letter_module_aliases(pkg):
    bad = []
    for f in files(pkg):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bad += [(f.name, a.name, a.asname) for a in node.names if a.asname and len(a.asname) <= 2
                        and a.asname not in ("np", "mm", "io", "F")]
    assert bad == []
