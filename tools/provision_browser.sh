#!/usr/bin/env bash
# Headless Chromium (Debian's package) + playwright-core (npm, pinned) for the frontend checks
# (tests/server/test_workflows_frontend.py, tools/frontend.py). Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PW_VERSION="1.65.1"
DEST="$ROOT/.cache/browser"
log() { echo "[provision-browser] $*" >&2; }
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's chromium"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    log "chromium is missing and cannot be installed here (needs root + apt-get): install Debian's 'chromium'"
    exit 1
  fi
fi
if ! command -v node >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's nodejs + npm"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  else
    log "node is missing: install nodejs + npm"
    exit 1
  fi
fi
if [ "$(cat "$DEST/node_modules/playwright-core/package.json" 2>/dev/null | grep -o "\"version\": \"$PW_VERSION\"")" = "" ]; then
  log "playwright-core $PW_VERSION into $DEST"
  mkdir -p "$DEST"
  [ -f "$DEST/package.json" ] || echo '{"name": "safegen-browser", "private": true}' > "$DEST/package.json"
  npm install --prefix "$DEST" --no-audit --no-fund --silent "playwright-core@$PW_VERSION" >/dev/null
fi
