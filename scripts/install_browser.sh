#!/usr/bin/env bash
# Installs Debian's Chromium for the headless dashboard test (tests/test_dashboard.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Prints one line.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
  exit 0
fi
source "$(dirname "$0")/apt.sh"
apt_install install_browser chromium
echo "install_browser: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
