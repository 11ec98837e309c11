#!/usr/bin/env bash
# Provision a second venv to test/benchmark this pack against another ComfyUI checkout
# (`make test-compat COMFYUI=DIR`, `make bench COMFYUI=DIR`).
#
#   tools/provision_compat.sh COMFYUI_DIR                 provision (idempotent, stamp file)
#   tools/provision_compat.sh --print-python COMFYUI_DIR  only print that venv's python path
#
# The venv lives in <repo>/.cache/compat/<hash of the checkout's real path + version>/venv
# (git-ignored; `make clean` removes it): torch pinned by tools/constraints.txt (CPU build),
# the checkout's requirements.txt + requests, this pack's requirements.txt + requirements-dev.txt;
# torchvision/torchaudio are uninstalled when they do not import (PyPI's link CUDA).
# In the checkout it links this repo as custom_nodes/safegen and writes
# user/default/comfy.settings.json ({"Comfy.TutorialCompleted": true}) if absent. The ComfyUI
# code itself is never copied into this repository.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SG_LOG_TAG=provision-compat
# shellcheck source=tools/provision_lib.sh
. "$ROOT/tools/provision_lib.sh"

usage() { echo "usage: $0 [--print-python] COMFYUI_DIR" >&2; exit 2; }
MODE=provision
if [ "${1:-}" = "--print-python" ]; then MODE=print; shift; fi
[ $# -eq 1 ] && [ -n "$1" ] || usage
if [ ! -f "$1/main.py" ] || [ ! -f "$1/requirements.txt" ]; then
  sg_log "not a ComfyUI checkout (no main.py/requirements.txt): $1"
  exit 2
fi
COMFY="$(cd "$1" && pwd -P)"
case "$COMFY/" in
  "$ROOT"/*) [ "$COMFY" = "$ROOT/.comfyui" ] || { sg_log "refusing a ComfyUI tree inside the repo: $COMFY"; exit 2; } ;;
esac
VERSION="$(sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null | head -1)"
[ -n "$VERSION" ] || VERSION="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$COMFY/pyproject.toml" 2>/dev/null | head -1)"
[ -n "$VERSION" ] || VERSION=unknown
KEY="$(printf '%s\n%s\n' "$COMFY" "$VERSION" | sha256sum | cut -c1-16)"
DIR="$ROOT/.cache/compat/$KEY"
VENV="$DIR/venv"
if [ "$MODE" = print ]; then
  echo "$VENV/bin/python"
  exit 0
fi

STAMP="$VENV/.provisioned"
WANT="compat-v1 $VERSION $(cat "$COMFY/requirements.txt" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" \
  "$ROOT/tools/constraints.txt" | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  sg_log "up to date ($VENV for ComfyUI $VERSION at $COMFY)"
else
  t0=$(date +%s)
  sg_log "ComfyUI $VERSION at $COMFY -> $VENV"
  mkdir -p "$DIR"
  printf 'comfyui_dir=%s\nversion=%s\n' "$COMFY" "$VERSION" > "$DIR/checkout.txt"
  sg_make_venv "$VENV"
  sg_install_requirements "$COMFY"
  sg_drop_broken_torch_extras
  echo "$WANT" > "$STAMP"
  sg_log "done in $(( $(date +%s) - t0 )) s"
fi
sg_comfy_settings "$COMFY"
sg_link_pack "$COMFY"
