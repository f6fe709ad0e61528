#!/usr/bin/env bash
# The dashboard's browser test (tests/browser/dashboard.mjs): a live `colony demo` swarm seen
# through headless Debian Chromium driven by playwright-core. Installs what it needs on a fresh
# machine: chromium and Node.js from apt, playwright-core from npm (tests/browser/package-lock.json).
# Screenshots go to target/browser/.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || need_apt+=(chromium)
{ command -v node && command -v npm; } >/dev/null || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "missing: ${need_apt[*]} (install them, or run as root)" >&2
    exit 1
  fi
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
[ -x target/debug/colony ] || cargo build -p colony-daemon --bin colony
scripts/fetch-data.sh >/dev/null
node tests/browser/dashboard.mjs
