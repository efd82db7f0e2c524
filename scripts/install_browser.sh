#!/usr/bin/env bash
# Installs Debian's Chromium for the headless dashboard test (tests/test_dashboard.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Prints one line.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install_browser: not root and no sudo; install the chromium package by hand" >&2; exit 1; }
  SUDO=(sudo)
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { "${SUDO[@]}" apt-get update -qq &&
       "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  echo "install_browser: apt-get install chromium failed (see above)" >&2
  exit 1
fi
echo "install_browser: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
