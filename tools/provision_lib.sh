# Functions shared by tools/provision.sh (the default host: .venv + .comfyui) and
# tools/provision_compat.sh (a venv for another ComfyUI checkout). Sourced, never run.
# The caller sets ROOT (this repository) and SG_LOG_TAG; sg_make_venv sets VPY.

sg_log() { echo "[${SG_LOG_TAG:-provision}] $*" >&2; }

# The interpreter that creates venvs: $PYTHON, else python3.11, else python3.
sg_base_python() {
  local py="${PYTHON:-python3.11}"
  command -v "$py" >/dev/null || py=python3
  echo "$py"
}

# pip on this machine warns about find-links folders that do not exist; keep real errors only.
sg_pipq() { "$VPY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }

# sg_make_venv VENV: create it if needed, set VPY, upgrade pip, install the pinned CPU torch.
sg_make_venv() {
  local venv="$1"
  [ -x "$venv/bin/python" ] || "$(sg_base_python)" -m venv "$venv"
  VPY="$venv/bin/python"
  sg_pipq install -q --progress-bar off --upgrade pip >/dev/null || true
  sg_log "torch $(sed -n 's/^torch==//p' "$ROOT/tools/constraints.txt") (CPU)"
  sg_pipq install -q --progress-bar off -c "$ROOT/tools/constraints.txt" torch
}

# sg_install_requirements COMFY_DIR: that ComfyUI's requirements.txt + requests (its frontend
# manager imports it; 0.3.75 does not list it), then this pack's runtime and dev requirements,
# all with torch pinned by tools/constraints.txt (a plain `torch` would pull a CUDA build).
sg_install_requirements() {
  local comfy="$1"
  sg_log "ComfyUI requirements ($comfy) + pack requirements + dev requirements (torch pinned)"
  sg_pipq install -q --progress-bar off -c "$ROOT/tools/constraints.txt" -r "$comfy/requirements.txt" requests
  sg_pipq install -q --progress-bar off -c "$ROOT/tools/constraints.txt" \
    -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"
}

# PyPI's torchvision/torchaudio link CUDA and do not load beside torch+cpu: remove them when
# they do not import (the test host then uses tools/torchvision_stub, tools/torchaudio_stub).
sg_drop_broken_torch_extras() {
  if ! "$VPY" -c "import torchvision.ops" >/dev/null 2>&1; then
    sg_pipq uninstall -y -q torchvision >/dev/null 2>&1 || true
  fi
  if ! "$VPY" -c "import torchaudio" >/dev/null 2>&1; then
    sg_pipq uninstall -y -q torchaudio >/dev/null 2>&1 || true
  fi
}

# sg_comfy_settings COMFY_DIR: stop the templates dialog covering the graph on first load
# (written only when the user has no settings file yet).
sg_comfy_settings() {
  local f="$1/user/default/comfy.settings.json"
  mkdir -p "$(dirname "$f")"
  [ -f "$f" ] || echo '{"Comfy.TutorialCompleted": true}' > "$f"
}

# sg_link_pack COMFY_DIR: this repository as COMFY_DIR/custom_nodes/safegen (a symlink; always
# re-made, the checkout may have moved). Refuses to touch a real folder of that name.
sg_link_pack() {
  local link="$1/custom_nodes/safegen"
  mkdir -p "$1/custom_nodes"
  if [ -e "$link" ] && [ ! -L "$link" ]; then
    sg_log "$link exists and is not a symlink: left alone (remove it to link this checkout)"
    return 1
  fi
  ln -sfn "$ROOT" "$link"
}
