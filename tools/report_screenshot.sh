#!/usr/bin/env bash
# Render a `fisher-stein report` page in headless Chromium: a full-page PNG screenshot, and a check
# that the page logged no console errors (uncaught exceptions, failed loads, console.error).
#
#   tools/report_screenshot.sh DIR/report.html [OUT.png]     # exit 1 if the console shows errors
#   tools/report_screenshot.sh --self-test                    # proves the check catches an error
#
# Needs `chromium` (Debian: apt-get install chromium). Not part of `cargo test` (CI has no
# browser). How errors are caught: Chromium is run with --enable-logging=stderr --v=0, which
# writes every console message of the page as a `CONSOLE(line)` log line, with its level
# (INFO/WARNING/ERROR) and text; uncaught exceptions appear as "Uncaught ...". The script fails
# on any ERROR-level console line, "Uncaught", or a failed resource load (net::ERR_).
set -euo pipefail

chrome=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [[ -z "$chrome" ]]; then
  echo "error: no chromium found: apt-get install chromium (or set CHROMIUM=/path/to/chrome)" >&2
  exit 2
fi

render() { # html png log
  local html=$1 png=$2 log=$3 profile
  profile=$(mktemp -d)
  local flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
    --disable-background-networking --disable-component-update --disable-sync
    --user-data-dir="$profile" --enable-logging=stderr --v=0 --hide-scrollbars
    --virtual-time-budget=3000)
  # 1. The console: load the page and dump its DOM (runs its scripts, if any).
  timeout 120 "$chrome" "${flags[@]}" --dump-dom "file://$(realpath "$html")" >"$log.dom" 2>"$log" || true
  # 2. The screenshot of a 1200-pixel-wide window, SCREENSHOT_HEIGHT (default 6000) pixels tall
  #    (headless Chromium captures the window, not the whole page).
  local height=${SCREENSHOT_HEIGHT:-6000}
  timeout 120 "$chrome" "${flags[@]}" --window-size=1200,"$height" --screenshot="$png" \
    "file://$(realpath "$html")" >>"$log" 2>&1 || true
  rm -rf "$profile"
  [[ -s "$png" ]] || { echo "error: chromium wrote no screenshot (log: $log)" >&2; return 2; }
}

console_errors() { # log -> prints offending lines, status 0 if any
  grep -E 'CONSOLE.*(Uncaught|ERROR)|:ERROR:CONSOLE|Uncaught|net::ERR_' "$1" \
    | grep -v -E 'dbus|Fontconfig|gpu_|sandbox|crashpad|ALSA|viz_main|angle' || return 1
}

if [[ "${1:-}" == "--self-test" ]]; then
  tmp=$(mktemp -d)
  printf '<!DOCTYPE html><html><body><p>broken</p><script>undefinedFunction();</script></body></html>' >"$tmp/bad.html"
  printf '<!DOCTYPE html><html><body><p>fine</p><script>console.log("ok")</script></body></html>' >"$tmp/good.html"
  render "$tmp/bad.html" "$tmp/bad.png" "$tmp/bad.log"
  render "$tmp/good.html" "$tmp/good.png" "$tmp/good.log"
  if console_errors "$tmp/bad.log" >/dev/null && ! console_errors "$tmp/good.log" >/dev/null; then
    echo "self-test passed: an uncaught error is detected, a clean page is not flagged"
    rm -rf "$tmp"
    exit 0
  fi
  echo "self-test FAILED: logs in $tmp" >&2
  exit 1
fi

html=${1:?usage: tools/report_screenshot.sh DIR/report.html [OUT.png] | --self-test}
png=${2:-${html%.html}.png}
log=$(mktemp)
render "$html" "$png" "$log"
if errs=$(console_errors "$log"); then
  echo "console errors while rendering $html:" >&2
  echo "$errs" >&2
  exit 1
fi
# The page must actually have rendered its plots and tables.
for needle in 'id="plot-spectra"' 'id="plot-effective_rank"' 'id="plot-entropy_trace"' '<table'; do
  grep -q "$needle" "$log.dom" || { echo "error: rendered DOM lacks $needle" >&2; exit 1; }
done
rm -f "$log" "$log.dom"
echo "wrote $png ($(stat -c %s "$png") bytes); no console errors"
