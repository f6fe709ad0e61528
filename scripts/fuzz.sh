#!/usr/bin/env bash
# Fuzzes every decoder of the wire protocol with libFuzzer (cargo-fuzz), then keeps a sample
# of each target's corpus in protocol/tests/fuzz_corpus/ for CI to replay.
# Not run by CI. Usage: scripts/fuzz.sh [seconds per target, default 60] [target …]
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/../protocol"
secs=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
for t in "${targets[@]}"; do
  echo "== fuzzing $t for ${secs}s"
  # A crash ends that target's run (its input is in fuzz/artifacts/<target>/); go on with
  # the others.
  cargo fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 3 ||
    echo "!! $t: the fuzzer stopped on a failing input (fuzz/artifacts/$t/)"
  # A sample of what the fuzzer kept (the 24 smallest and the 24 largest inputs) becomes the
  # corpus CI replays (tests/fuzz_replay.rs).
  keep=tests/fuzz_corpus/$t
  mkdir -p "$keep"
  # shellcheck disable=SC2012 # corpus file names are hex digests
  { ls -S "fuzz/corpus/$t" | head -24; ls -Sr "fuzz/corpus/$t" | head -24; } | sort -u |
    while read -r f; do cp "fuzz/corpus/$t/$f" "$keep/$f"; done
  [ -d "fuzz/artifacts/$t" ] && ls "fuzz/artifacts/$t"
done
