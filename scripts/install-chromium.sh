#!/usr/bin/env bash
# The browser the dashboard tests drive (tests/integration/browser.py): Debian's chromium,
# installed with apt when it is missing. Playwright's own browser download is never used
# (it cannot be reached from a closed network, and the distribution's build is patched and
# kept current by Debian). POSTTRADE_CHROMIUM names another binary instead.
set -euo pipefail

if [ -n "${POSTTRADE_CHROMIUM:-}" ]; then
    [ -x "$POSTTRADE_CHROMIUM" ] || { echo "POSTTRADE_CHROMIUM=$POSTTRADE_CHROMIUM is not an executable" >&2; exit 1; }
    exit 0
fi
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "chromium is missing and installing it needs root: apt-get install chromium" >&2; exit 1; }
    sudo="sudo -n"
fi
echo "installing chromium (apt) for the dashboard tests ..."
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
$sudo apt-get install -y -q --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null
