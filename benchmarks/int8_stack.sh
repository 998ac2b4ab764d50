#!/usr/bin/env bash
# The int8 stack behind docs/benchmarks.md ("int8 stacked on pruning"): unpruned fp32, pruned fp32,
# unpruned int8 and pruned int8 timed in one interleaved run per thread count (ONNX Runtime CPU,
# random weights, keep 0.7 at blocks 3, 6, 9). Exports (vit_base ~350 MB fp32, ~90 MB int8) go to
# $EXPORTS, never into the repo; the counterparts are cached in $EXPORTS/.colln-cache.
#   ROUNDS=10 EXPORTS=/tmp/colln-bench benchmarks/int8_stack.sh deit_small vit_base
set -euo pipefail
cd "$(dirname "$0")/.."
EXPORTS=${EXPORTS:-/tmp/colln-bench}
ROUNDS=${ROUNDS:-10}
WARMUP=${WARMUP:-2}
RESULTS=benchmarks/results
mkdir -p "$RESULTS" "$EXPORTS"

models=("$@")
[ ${#models[@]} -gt 0 ] || models=(deit_small vit_base)
for model in "${models[@]}"; do
  out=$EXPORTS/$model-colln-keep0.7-int8
  [ -d "$out" ] || colln-export "$model" --weights random --keep 0.7 --layers 3,6,9 --precision int8 \
    --no-latency --out "$out"
  for threads in 0 1; do  # 0 = ONNX Runtime's default (2 intra-op threads on this machine)
    echo "load before $model t$threads: $(cut -d' ' -f1-3 /proc/loadavg)"
    colln-bench "$out" --batch 1,8 --rounds "$ROUNDS" --warmup "$WARMUP" --threads "$threads" \
      --json "$RESULTS/int8-stack-$model-t$threads.json"
  done
done
