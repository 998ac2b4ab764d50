#!/usr/bin/env bash
# Issue 25's numbers: one model per modern family pruned at keep 0.7 (blocks at the quarter points)
# against its unpruned counterpart, ONNX Runtime and OpenVINO fp32, batch 1 and 8, in one interleaved
# run per model (efficiency = paired speedup / FLOPs bound), plus DINOv3 at 512 px (1024 patches),
# where attention's N^2 share and the bound grow. Random weights (latency does not depend on them).
# Exports go to $EXPORTS, never into the repo. Run it on a quiet machine:
#   ROUNDS=20 EXPORTS=/tmp/colln-bench benchmarks/families.sh
#   ROUNDS=3 benchmarks/families.sh digits_eva            # a quick smoke run (bundled weights)
set -euo pipefail
cd "$(dirname "$0")/.."
EXPORTS=${EXPORTS:-/tmp/colln-bench}
ROUNDS=${ROUNDS:-20}
WARMUP=${WARMUP:-3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS" "$EXPORTS"

cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(vit_small_patch16_dinov3 eva02_small_patch14_224 vit_pe_core_small_patch16_384 vit_small_patch16_dinov3@512)
for case in "${cases[@]}"; do
  model=${case%@*}
  size=$([ "$case" != "$model" ] && echo "${case#*@}" || true)
  args=(--keep 0.7)
  [ "$model" = digits_eva ] || args+=(--weights random)
  [ -z "$size" ] || args+=(--img-size "$size")
  out=$EXPORTS/$model${size:+-$size}-colln-keep0.7-openvino
  [ -d "$out" ] || .venv/bin/colln-export "$model" "${args[@]}" --openvino --no-latency --out "$out"
  echo "load before $case: $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/colln-bench "$out" --runtimes onnxruntime,openvino --batch 1,8 --rounds "$ROUNDS" --warmup "$WARMUP" \
    --json "$RESULTS/families-$model${size:+-$size}.json"
done
