"""ComfyUI's real frontend in headless Chromium, for the pack's workflows.

    .venv/bin/python tools/frontend.py convert   # workflows/api/*.json -> workflows/*.json (UI format, laid
                                                 # out by tools/workflow_layout.py)
    .venv/bin/python tools/frontend.py check     # load every workflows/*.json, screenshots in artifacts/frontend/

Both start a ComfyUI server of their own (tools/comfy_host.py) with this pack; ``check`` runs with
the model files the workflows name present as empty placeholders (see MODEL_FILE_INPUTS). The browser side is
``tools/frontend/frontend.js`` (playwright-core driving Debian's chromium; provisioned by
``tools/provision_browser.sh``).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

JS = REPO / "tools" / "frontend" / "frontend.js"
NODE_MODULES = REPO / ".cache" / "browser" / "node_modules"
ARTIFACTS = REPO / "artifacts" / "frontend"


class FrontendError(RuntimeError):
    pass


def ensure_browser() -> None:
    """Chromium + node + playwright-core present (runs tools/provision_browser.sh, idempotent)."""
    p = subprocess.run(["bash", str(REPO / "tools" / "provision_browser.sh")], capture_output=True, text=True)
    if p.returncode != 0:
        raise FrontendError(f"browser provisioning failed:\n{p.stderr[-2000:]}")


def run_js(mode: str, url: str, out_dir: Path, files: list[Path], timeout: float = 600,
           layouts: Path | None = None) -> list[dict]:
    """Run frontend.js ``mode`` on ``files``; ``layouts``: for convert, a JSON file {workflow name:
    tools.workflow_layout.resolve(...)} applied to each converted graph."""
    env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
    if layouts is not None:
        env["SAFEGEN_LAYOUTS"] = str(layouts)
    p = subprocess.run(["node", str(JS), mode, url, str(out_dir), *map(str, files)], capture_output=True,
                       text=True, env=env, timeout=timeout, cwd=str(REPO))
    if p.returncode != 0:
        raise FrontendError(f"frontend.js {mode} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]


def ui_workflows() -> list[Path]:
    return sorted((REPO / "workflows").glob("*.json"))


def api_twin(ui_path: Path) -> Path:
    return ui_path.parent / "api" / ui_path.name


def normalise_api(api: dict) -> dict:
    """class_type + inputs of each node (drops _meta; links as [str id, int slot])."""
    out = {}
    for nid, node in api.items():
        inputs = {k: ([str(v[0]), int(v[1])] if isinstance(v, list) and len(v) == 2 else v)
                  for k, v in node["inputs"].items()}
        out[str(nid)] = {"class_type": node["class_type"], "inputs": inputs}
    return out


# Widgets the frontend adds for display only: the server declares no such input and ignores it.
# PreviewAny's "preview" text: frontend 1.32 (ComfyUI 0.3.75) sends it in API JSON, 1.49 (0.33) no
# longer does. Only these may differ between the frontend's API conversion and the API twin.
FRONTEND_ONLY_INPUTS = frozenset({("PreviewAny", "preview")})


def declared_inputs(object_info: dict) -> dict[str, set[str]]:
    """{node type: names of the inputs the server declares (required + optional)}."""
    return {t: set((d.get("input") or {}).get("required") or {}) | set((d.get("input") or {}).get("optional") or {})
            for t, d in object_info.items()}


def split_declared(api: dict, declared: dict[str, set[str]]) -> tuple[dict, set[tuple[str, str]]]:
    """``normalise_api(api)`` restricted to the inputs the server declares for each node type, and
    the (node type, input) pairs left out (frontend-only widgets; node types the server lacks keep
    all their inputs)."""
    out, dropped = {}, set()
    for nid, node in normalise_api(api).items():
        ct, names = node["class_type"], declared.get(node["class_type"])
        if names is not None:
            dropped |= {(ct, k) for k in node["inputs"] if k not in names}
            node = {"class_type": ct, "inputs": {k: v for k, v in node["inputs"].items() if k in names}}
        out[nid] = node
    return out, dropped


# Model files the example workflows name, by (node type, input) -> models/ folder. Frontend >= 1.4x
# (ComfyUI 0.33) marks a node as in error when its model file is missing on the server (setting
# Comfy.RightSidePanel.ShowErrorsTab, on by default); 1.32 did not. The frontend checks therefore
# run with these names present (empty, name-only placeholder files, removed afterwards), so that
# any node error left is a real one.
MODEL_FILE_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("SafeGen_UnlearnedUNetLoader", "unet_name"): "diffusion_models",
    ("SafeGen_LoadImplicitNegativeEmbedding", "embedding_name"): "embeddings",
}


def _choices(spec) -> list | None:
    """The fixed choices of an object_info input spec (old ``[[...], {...}]`` or ``["COMBO",
    {"options": [...]}]``), or None for a non-choice input."""
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return list(spec[1].get("options") or [])
    return None


def unoffered_choices(graphs: dict[str, dict], object_info: dict) -> list[tuple[str, str, str, str, object]]:
    """(workflow, node id, node type, input, value) for every fixed-choice input whose value the
    server does not offer (``graphs``: {workflow name: API graph})."""
    out = []
    for wf, api in graphs.items():
        for nid, node in api.items():
            spec_in = (object_info.get(node["class_type"]) or {}).get("input") or {}
            specs = {**(spec_in.get("optional") or {}), **(spec_in.get("required") or {})}
            for k, v in node["inputs"].items():
                choices = _choices(specs.get(k))
                if choices is not None and not isinstance(v, list) and v not in choices:
                    out.append((wf, str(nid), node["class_type"], k, v))
    return out


@contextlib.contextmanager
def model_placeholders(models_dir: Path, graphs: dict[str, dict], object_info: dict) -> Iterator[list[Path]]:
    """Empty files named as the model files that ``graphs`` reference and the server lacks
    (MODEL_FILE_INPUTS), for the duration of the block; yields the files made (never touches an
    existing file)."""
    made: list[Path] = []
    try:
        for _wf, _nid, ct, k, v in unoffered_choices(graphs, object_info):
            folder = MODEL_FILE_INPUTS.get((ct, k))
            path = Path(models_dir) / folder / str(v) if folder else None
            if path is None or path.exists() or path in made:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
            made.append(path)
        yield made
    finally:
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("convert", "check"))
    a = ap.parse_args(argv)
    from tools.comfy_host import ComfyServer
    from tools.workflow_layout import resolve
    from tools.workflows import API_DIR, WORKFLOWS, build, write_api
    ensure_browser()
    with tempfile.TemporaryDirectory(prefix="safegen-frontend-") as td, ComfyServer(td) as srv:
        if a.mode == "convert":
            layouts = Path(td) / "layouts.json"
            layouts.write_text(json.dumps({name: resolve(name, build(name)) for name in WORKFLOWS}))
            res = run_js("convert", srv.url, REPO / "workflows", write_api(API_DIR), layouts=layouts)
        else:
            graphs = {name: build(name) for name in WORKFLOWS}
            with model_placeholders(srv.models_dir, graphs, srv.object_info()):
                unoffered = unoffered_choices(graphs, srv.object_info())
                res = run_js("check", srv.url, ARTIFACTS, ui_workflows())
    bad = 0
    for u in unoffered if a.mode == "check" else ():
        bad += 1
        print(f"BAD choice the server does not offer (workflow, node, type, input, value): {u}")  # noqa: T201
    for r in res:
        if a.mode == "check":
            ok = r["loaded"] and not (r["missing"] or r["errors"] or r["dialog"])
            bad += not ok
            print(f"{'OK ' if ok else 'BAD'} {Path(r['file']).name}: {r['n_nodes']} nodes, missing {r['missing']}, "  # noqa: T201
                  f"errors {r['errors']}, screenshot {r['screenshot']}")
        else:
            print(f"wrote {r['out']} ({r['nodes']} nodes)")  # noqa: T201
            for gr in r.get("grown") or ():
                bad += 1
                print(f"BAD layout: node {gr['id']} is {gr['want']} in the layout, the frontend needs {gr['got']}")  # noqa: T201
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
