#!/usr/bin/env bash
# Installs Debian's Chromium for the dashboard's browser tests (tests/web/test_dashboard.py).
# Playwright drives /usr/bin/chromium; its own browser download cannot work here.
# Idempotent and quick when Chromium is already there.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
/usr/bin/chromium --version 2>/dev/null || true
