#!/usr/bin/env bash
# GPU figures of `colony bench train` (BENCHMARKS.md), run on the H200 device machine.
#
# Here:   CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda -p colony-daemon --bin colony
#         mkdir -p .cache/fortunes && cp /usr/share/games/fortunes/* .cache/fortunes/ && rm .cache/fortunes/*.{dat,u8}
# There:  scripts/gpu-train-bench.sh single   (one GPU: albert-tiny and albert-base samples/s)
#         scripts/gpu-train-bench.sh pair     (two GPUs of one host: 2 peers, communication share)
#         scripts/gpu-train-bench.sh swav     (one GPU: swav-resnet18 samples/s, synthetic images)
#         scripts/gpu-train-bench.sh swav-pair (two GPUs: swav-resnet18, without and with delayed
#                                               parameter updates)
# carrying target-cuda/release/colony and .cache/fortunes. Results go to $OUT (or /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${COLONY_BIN:-target-cuda/release/colony}
data=${DATA:-.cache/fortunes}
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
case "${1:-single}" in
single)
  "$bin" bench train --backend cuda --single-only --model albert-tiny --data "$data" \
    --target-batch 256 --micro-batch 256 --seq 128 --steps 5 --json "$out/gpu-albert-tiny.json"
  "$bin" bench train --backend cuda --single-only --model albert-base --data "$data" \
    --target-batch 256 --micro-batch 64 --seq 128 --steps 5 --json "$out/gpu-albert-base.json"
  ;;
pair)
  "$bin" bench train --backend cuda --gpus 2 --peers 2 --model albert-base --data "$data" \
    --target-batch 512 --micro-batch 64 --seq 128 --steps 6 --lr 0.00176 --json "$out/gpu-albert-base-pair.json"
  ;;
swav)
  "$bin" bench train --backend cuda --single-only --model swav-resnet18 --data synthetic \
    --target-batch 256 --micro-batch 64 --steps 5 --json "$out/gpu-swav-resnet18.json"
  ;;
swav-pair)
  for d in "" --delayed; do
    "$bin" bench train --backend cuda --gpus 2 --peers 2 --model swav-resnet18 --data synthetic \
      --target-batch 512 --micro-batch 64 --steps 4 $d --json "$out/gpu-swav-resnet18-pair${d}.json"
  done
  ;;
*) echo "usage: $0 single|pair|swav|swav-pair" >&2; exit 2 ;;
esac
