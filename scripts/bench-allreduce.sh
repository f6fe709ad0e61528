#!/usr/bin/env bash
# The all-reduce figures in BENCHMARKS.md: every profile of `colony bench allreduce` (8 processes
# in network namespaces, tbf-shaped links, 64 MiB vector, 3 measured rounds after a warm-up)
# with hivemind 1.1.12 run on the same namespaces, shaping and vector size; prints the table.
# Needs root (namespaces, tc). Takes about 30 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/hivemind-venv.sh
cargo build --release -p colony-daemon
out=${1:-target/bench/allreduce.json}
mkdir -p "$(dirname "$out")"
target/release/colony bench allreduce --rounds 3 --hivemind --json "$out" "${@:2}"
python3 - "$out" <<'PY'
import json, sys
cases = json.load(open(sys.argv[1]))["cases"]
print("| profile | Colony makespan s (rounds) | lower bound s | ratio | max abs err | hivemind s (rounds) | hivemind / Colony | hivemind max abs err | hivemind wrong rounds |")
print("|---|---|---|---|---|---|---|---|---|")
for c in cases:
    hm = c.get("hivemind_makespan_s")
    rounds = ", ".join(f"{x:.2f}" for x in c["makespans_s"])
    hrounds = ", ".join(f"{x:.2f}" for x in c.get("hivemind_makespans_s", []))
    herr = c.get("hivemind_max_abs_err")
    print(f"| {c['profile']} | {c['makespan_s']:.2f} ({rounds}) | {c['lower_bound_s']:.2f} | "
          f"{c['ratio_to_bound']:.3f} | {c['max_abs_err']:.1e} | "
          + (f"{hm:.2f} ({hrounds}) | {hm / c['makespan_s']:.2f}× | {herr:.1e} | {c['hivemind_wrong_rounds']} of {len(c['makespans_s'])} |" if hm else "– | – | – | – |"))
PY
