#!/usr/bin/env bash
# The cross-runtime stack of docs/openvino.md (issue 21's "numbers to reach"): ONNX Runtime and
# OpenVINO, unpruned and pruned, fp32 / int8 (+ bf16 on OpenVINO), batch 1 and 8, in ONE
# interleaved run per thread count (random weights, keep 0.7 at blocks 3, 6, 9). Speedups are over
# ONNX Runtime fp32 unpruned and over each runtime's own unpruned variant at the same precision.
# Exports go to $EXPORTS, never into the repo; the counterparts (and their IRs) are cached in
# $EXPORTS/.colln-cache. Run it on a quiet machine:
#   ROUNDS=20 EXPORTS=/tmp/colln-bench benchmarks/openvino_stack.sh deit_small vit_base
#   ROUNDS=5 benchmarks/openvino_stack.sh digits_vit          # a quick smoke run (bundled weights)
set -euo pipefail
cd "$(dirname "$0")/.."
EXPORTS=${EXPORTS:-/tmp/colln-bench}
ROUNDS=${ROUNDS:-20}
WARMUP=${WARMUP:-3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS" "$EXPORTS"

models=("$@")
[ ${#models[@]} -gt 0 ] || models=(deit_small vit_base)
for model in "${models[@]}"; do
  if [ "$model" = digits_vit ]; then args=(--keep 0.7); else args=(--weights random --keep 0.7 --layers 3,6,9); fi
  out=$EXPORTS/$model-colln-keep0.7-int8-openvino
  # The int8 export with its NNCF IR, both calibrated on the default validation images.
  [ -d "$out" ] || colln-export "$model" "${args[@]}" --precision int8 --openvino --no-latency --no-fail --out "$out"
  for threads in 0 1; do  # 0 = each runtime's default thread count
    echo "load before $model t$threads: $(cut -d' ' -f1-3 /proc/loadavg)"
    colln-bench "$out" --runtimes onnxruntime,openvino --batch 1,8 --rounds "$ROUNDS" --warmup "$WARMUP" \
      --threads "$threads" --json "$RESULTS/openvino-stack-$model-t$threads.json"
  done
done
