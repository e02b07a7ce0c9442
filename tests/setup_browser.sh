#!/bin/sh
# The browser tests' Chromium: Debian's `chromium` package where it is missing and apt is
# usable (root, or sudo without a password). Otherwise say so: the browser tests then skip
# with the same reason in their report.
set -u
for exe in "${PELLUCID_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -n "$exe" ] && [ -x "$exe" ]; then exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser: no Chromium and no apt-get: the browser tests will be skipped" >&2
    exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "setup_browser: no Chromium, and apt-get needs root: the browser tests will be skipped" >&2
    exit 0
fi
echo "setup_browser: installing Debian's chromium for the browser tests" >&2
$SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null \
    || echo "setup_browser: apt-get install chromium failed: the browser tests will be skipped" >&2
exit 0
