#!/usr/bin/env bash
# The settings-page journey in a real browser (tests/browser/journey.mjs): Debian's Chromium
# driven by playwright-core, against a running local stack (the one `make test` starts, or
# `make dev`'s when run by hand). Installs what it needs: Chromium from Debian's packages
# (as root; otherwise it says how), playwright-core from npm into tests/browser/node_modules.
# Screenshots: target/browser-e2e/ (SCREENSHOT_DIR).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

chromium="${CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "$chromium" ]]; then
  if [[ "$(id -u)" -ne 0 ]]; then
    echo "Chromium is needed at $chromium: install Debian's package (apt-get install chromium) or set CHROMIUM." >&2
    exit 1
  fi
  echo "Installing Debian's chromium..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends chromium >&2
fi
export CHROMIUM="$chromium"

browser="$root/tests/browser"
"$root/scripts/npm-ci.sh" "$browser"

if [[ -z "${FRONTEND_URL:-}" || -z "${LOCAL_API_URL:-}" ]]; then
  eval "$(scripts/local-stack.sh env)"
fi
export SCREENSHOT_DIR="${SCREENSHOT_DIR:-$root/target/browser-e2e}"
node --test --test-reporter=spec "$browser/journey.mjs"
echo "Screenshots: $SCREENSHOT_DIR" >&2
