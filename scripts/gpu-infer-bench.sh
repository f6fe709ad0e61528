#!/usr/bin/env bash
# GPU figures of `colony bench infer` (BENCHMARKS.md), run on the H200 device machine.
#
# Here:   CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda -p colony-daemon --bin colony
#         strip -o target-cuda/colony target-cuda/release/colony
# There:  scripts/gpu-infer-bench.sh   (carrying target-cuda/colony; python3 with PyTorch is the peer)
# Results go to $OUT (or /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${COLONY_BIN:-target-cuda/colony}
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$bin" bench infer --backend cuda --shape llama-3.2-1b --dtype "${DTYPE:-bf16}" \
  --contexts "${CONTEXTS:-1024,8192}" --workers "${WORKERS:-1,2,4,8}" --tokens "${PASSES:-32}" \
  --cache "${CACHE:-slab,block}" --fusion "${FUSION:-on,off}" \
  --torch "${TORCH:-auto}" --json "$out/gpu-infer.json"
