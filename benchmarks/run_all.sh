#!/usr/bin/env bash
# The runs behind docs/benchmarks.md (ONNX Runtime CPU, 1 intra-op thread, random weights).
# Exports (vit_base is ~350 MB each) go to $EXPORTS, never into the repo.
#   ROUNDS=30 EXPORTS=/tmp/colln-bench benchmarks/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EXPORTS=${EXPORTS:-/tmp/colln-bench}
ROUNDS=${ROUNDS:-30}
WARMUP=${WARMUP:-3}
RESULTS=benchmarks/results
BASELINE=benchmarks/baselines/$(python -c 'from colln.infer.environment import machine_id; print(machine_id())').json
mkdir -p "$RESULTS"

for model in deit_small vit_base; do
  for metric in colln cls; do
    out=$EXPORTS/$model-$metric-keep0.7
    [ -d "$out" ] || colln-export "$model" --weights random --keep 0.7 --layers 3,6,9 --metric "$metric" \
      --no-validate --no-latency --out "$out"
  done
  # Pruned vs unpruned, interleaved; the Col-Ln case is also this machine's regression baseline.
  colln-bench "$EXPORTS/$model-colln-keep0.7" --batch 1,8 --rounds "$ROUNDS" --warmup "$WARMUP" --threads 1 \
    --json "$RESULTS/$model-colln-keep0.7.json" --save-baseline "$BASELINE"
  # Col-Ln against [CLS] at the same plan (and the unpruned model), in one interleaved run.
  python benchmarks/compare.py "$EXPORTS/$model-cls-keep0.7" "$EXPORTS/$model-colln-keep0.7" \
    --batch 1,8 --rounds "$ROUNDS" --warmup "$WARMUP" --threads 1 | tee "$RESULTS/$model-colln-vs-cls.txt"
done

# Large batch (slow on one thread: deit_small only).
colln-bench "$EXPORTS/deit_small-colln-keep0.7" --batch 32 --rounds 15 --warmup 2 --threads 1 \
  --json "$RESULTS/deit_small-colln-keep0.7-batch32.json"

python benchmarks/keep_sweep.py deit_small --keep 0.5,0.6,0.7,0.8,0.9 --batch 8 --rounds "$ROUNDS" --warmup "$WARMUP" \
  --exports "$EXPORTS" --json "$RESULTS/keep_sweep_deit_small.json" --plot docs/benchmarks/speedup_vs_keep.png
python benchmarks/profile_ort.py "$EXPORTS/deit_small-cls-keep0.7" "$EXPORTS/deit_small-colln-keep0.7" \
  --batch 8 --runs 10 --out "$RESULTS/profile_deit_small_b8.md"
python benchmarks/table.py "$RESULTS"/*-colln-keep0.7*.json > "$RESULTS/table.md"
