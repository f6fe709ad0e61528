#!/usr/bin/env bash
# Runs `colony bench dht` RUNS times (default 3) at 1 and 8 operations in flight and prints the
# median and range of each figure, as recorded in BENCHMARKS.md. Results: target/bench/dht-*.json
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
cargo build --release -p colony-daemon --bin colony
mkdir -p target/bench
for i in $(seq 1 "$runs"); do
  for c in 1 8; do
    ./target/release/colony bench dht --concurrency "$c" --json "target/bench/dht-c$c-$i.json" "$@" >/dev/null
  done
done
python3 - "$runs" <<'PY'
import json, statistics as st, sys
runs = int(sys.argv[1])
fields = ["get_p50_ms", "get_p99_ms", "put_p50_ms", "put_p99_ms", "success_rate", "rss_per_node_mib", "join_s"]
print("| in flight | churn | " + " | ".join(fields) + " |")
print("|---|---|" + "---|" * len(fields))
for c in (1, 8):
    docs = [json.load(open(f"target/bench/dht-c{c}-{i}.json"))["cases"] for i in range(1, runs + 1)]
    for k in range(len(docs[0])):
        cases = [d[k] for d in docs]
        cells = []
        for f in fields:
            v = [x[f] for x in cases if x.get(f) is not None]
            cells.append(f"{st.median(v):.3g} ({min(v):.3g}–{max(v):.3g})" if v else "–")
        print(f"| {c} | {cases[0]['churn']} | " + " | ".join(cells) + " |")
PY
