"""ComfyUI's real frontend in headless Chromium, for the pack's workflows.

    .venv/bin/python tools/frontend.py convert   # workflows/api/*.json -> workflows/*.json (UI format)
    .venv/bin/python tools/frontend.py check     # load every workflows/*.json, screenshots in artifacts/frontend/

Both start a ComfyUI server of their own (tools/comfy_host.py) with this pack. The browser side is
``tools/frontend/frontend.js`` (playwright-core driving Debian's chromium; provisioned by
``tools/provision_browser.sh``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

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


def run_js(mode: str, url: str, out_dir: Path, files: list[Path], timeout: float = 600) -> list[dict]:
    env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
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


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("convert", "check"))
    a = ap.parse_args(argv)
    from tools.comfy_host import ComfyServer
    from tools.workflows import API_DIR, write_api
    ensure_browser()
    with tempfile.TemporaryDirectory(prefix="safegen-frontend-") as td, ComfyServer(td) as srv:
        if a.mode == "convert":
            res = run_js("convert", srv.url, REPO / "workflows", write_api(API_DIR))
        else:
            res = run_js("check", srv.url, ARTIFACTS, ui_workflows())
    bad = 0
    for r in res:
        if a.mode == "check":
            ok = not (r["missing"] or r["errors"] or r["dialog"])
            bad += not ok
            print(f"{'OK ' if ok else 'BAD'} {Path(r['file']).name}: {r['n_nodes']} nodes, missing {r['missing']}, "  # noqa: T201
                  f"errors {r['errors']}, screenshot {r['screenshot']}")
        else:
            print(f"wrote {r['out']} ({r['nodes']} nodes)")  # noqa: T201
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
