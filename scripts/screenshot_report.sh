#!/usr/bin/env bash
# Render an HTML report in a real browser (headless Chromium) and save a PNG of it.
#   scripts/screenshot_report.sh report.html [out.png]
# Needs Debian's chromium (apt-get install chromium); not part of the test suite.
set -euo pipefail
html=$(realpath "$1")
png=$(realpath -m "${2:-${1%.html}.png}")
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "screenshot_report: no chromium on PATH (apt-get install chromium)" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
    --window-size=1200,6000 --screenshot="$png" "file://$html" 2>/dev/null
echo "$png"
