#!/usr/bin/env bash
# The one runner behind every results file the docs cite: each section regenerates one table's raw
# results in benchmarks/results/ (and its figure under docs/), with the command the docs name.
# Exports (vit_base is ~350 MB each) go to $EXPORTS, never into the repo. Run it on a quiet machine;
# everything takes hours on 2 CPUs, so name the sections you need:
#   benchmarks/run_all.sh                    # all sections
#   benchmarks/run_all.sh pruning int8       # docs/benchmarks.md only
# Sections: pruning (docs/benchmarks.md, fp32 1 thread; refreshes this machine's regression
# baseline), int8 (docs/benchmarks.md), openvino (docs/openvino.md, README), families (issue 25's
# modern families), profile (docs/benchmarks.md "Where batch-1 time goes"), finetune (docs/finetune.md),
# merging (docs/merging.md), vlm (docs/vlm.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export EXPORTS=${EXPORTS:-/tmp/colln-bench}
ROUNDS=${ROUNDS:-30}
WARMUP=${WARMUP:-3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS" "$EXPORTS"

pruning() {
  local baseline model metric out
  baseline=benchmarks/baselines/$(python -c 'from colln.infer.environment import machine_id; print(machine_id())').json
  for model in deit_small vit_base; do
    for metric in colln cls; do
      out=$EXPORTS/$model-$metric-keep0.7
      [ -d "$out" ] || colln-export "$model" --weights random --keep 0.7 --layers 3,6,9 --metric "$metric" \
        --no-validate --no-latency --out "$out"
    done
    # Pruned vs unpruned, interleaved; the Col-Ln case is also this machine's regression baseline.
    colln-bench "$EXPORTS/$model-colln-keep0.7" --batch 1,8 --rounds "$ROUNDS" --warmup "$WARMUP" --threads 1 \
      --json "$RESULTS/$model-colln-keep0.7.json" --save-baseline "$baseline"
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
}

int8() {
  ROUNDS=10 benchmarks/int8_stack.sh deit_small vit_base
  python benchmarks/profile_ort.py "$EXPORTS/deit_small-colln-keep0.7-int8" --batch 8 \
    --out "$RESULTS/profile_deit_small_int8_b8.md"
}

openvino() {
  local m t
  ROUNDS=10 benchmarks/openvino_stack.sh deit_small vit_base
  for m in deit_small vit_base; do
    for t in 0 1; do
      python benchmarks/openvino_peer.py "$EXPORTS/$m-colln-keep0.7-int8-openvino" --threads "$t" \
        --json "$RESULTS/openvino-peer-$m-t$t.json"
    done
  done
}

families() {
  ROUNDS=20 benchmarks/families.sh
  python benchmarks/table.py --stack "$RESULTS"/families-*.json > "$RESULTS/families.md"
}

profile() {
  local fp32=$EXPORTS/deit_small-colln-keep0.7-openvino int8=$EXPORTS/deit_small-colln-keep0.7-int8-openvino
  local tower=$EXPORTS/qwen3_vit_88m_enc-tokens-keep0.7-0.5-L3-openvino
  # Profiles need no validation (random weights cannot pass int8's): the int8 stack holds every precision.
  [ -d "$int8" ] || colln-export deit_small --weights random --keep 0.7 --layers 3,6,9 --precision int8 --openvino \
    --no-latency --no-fail --out "$int8"
  python benchmarks/profile_b1.py "$int8" --runs 30 --threads 2 \
    --json "$RESULTS/profile_b1_deit_small.json" --out "$RESULTS/profile_b1_deit_small.md"
  [ -d "$tower" ] || colln-export qwen3_vit_88m_enc --output tokens --keep 0.7,0.5 --layers 3 --weights random --openvino \
    --no-latency --out "$tower"
  python benchmarks/profile_b1.py "$tower" --runs 3 --threads 2 \
    --json "$RESULTS/profile_b1_qwen3_vit_88m_enc.json" --out "$RESULTS/profile_b1_qwen3_vit_88m_enc.md"
  [ -d "$fp32" ] || colln-export deit_small --weights random --keep 0.7 --openvino --no-latency --out "$fp32"
  python benchmarks/scoring_attention.py "$fp32" --batch 1 --rounds 50 --warmup 3 --threads 2 \
    --json "$RESULTS/scoring_attention_deit_small.json"
}

finetune() {
  python benchmarks/finetune.py --runs /tmp/colln-finetune --json "$RESULTS/finetune_digits.json" \
    --plot docs/finetune/loss_colln_vs_cls.png
  local seed
  for seed in 1 2; do
    python benchmarks/finetune.py --seed "$seed" --runs "/tmp/colln-finetune-seed$seed" \
      --json "$RESULTS/finetune_digits_seed$seed.json" --plot "/tmp/colln-finetune-seed$seed/loss.png"
  done
  python benchmarks/finetune.py --only unpruned keep0.7@2,4,6 keep0.7@0,2,4 keep0.5@2,4,6 --seed 0 \
    --runs /tmp/colln-finetune-rerun --json "$RESULTS/finetune_digits_seed0_rerun.json" --plot /tmp/colln-finetune-rerun/loss.png
}

merging() {
  python benchmarks/merge_digits.py --json "$RESULTS/merge_digits.json"
  python benchmarks/merge_cost.py --model digits_vit --json "$RESULTS/merge_cost_digits.json"
  python benchmarks/merge_cost.py --model deit_small --weights random --rounds 15 --json "$RESULTS/merge_cost_deit_small.json"
  local t suffix
  for t in 1 0; do
    suffix=$([ "$t" = 0 ] && echo _t0 || true)
    python benchmarks/merge_cost.py --model vit_base --weights random --tome 8,13 --batch 8 --threads "$t" --rounds 15 \
      --json "$RESULTS/merge_cost_vit_base$suffix.json"
  done
  python benchmarks/merge_matched.py sweep --batches 1,8 --rounds 100 --threads 1 --json "$RESULTS/merge_matched_digits.json"
  python benchmarks/merge_matched.py finetune --sweep-json "$RESULTS/merge_matched_digits.json" \
    --runs /tmp/colln-merge-ft --json "$RESULTS/merge_finetune_digits.json"
}

vlm() {
  python benchmarks/vlm.py --rounds 5 --val-limit 2 --out "$RESULTS/vlm_clip_l336.json"
  local case
  for case in final-only inner-L2-4-6+final; do
    colln-bench "exports/vit_large_patch14_clip_336-tokens-$case" --batch 1 --rounds 8 --warmup 1 --threads 0 \
      --json "$RESULTS/vlm_clip_l336-bench-$case.json"
  done
  # Qwen3-VL's tower, validated on ONNX Runtime and OpenVINO, timed on both in one interleaved run.
  local tower=$EXPORTS/qwen3_vit_88m_enc-tokens-keep0.7-0.5-L3-openvino
  [ -d "$tower" ] || colln-export qwen3_vit_88m_enc --output tokens --keep 0.7,0.5 --layers 3 --weights random --openvino \
    --no-latency --out "$tower"
  colln-bench "$tower" --runtimes onnxruntime,openvino --batch 1 --rounds 10 --warmup 2 \
    --json "$RESULTS/towers-qwen3_vit_88m_enc.json"
}

sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(pruning int8 openvino families profile finetune merging vlm)
for section in "${sections[@]}"; do
  case $section in
    pruning | int8 | openvino | families | profile | finetune | merging | vlm) "$section" ;;
    *) echo "run_all.sh: unknown section $section (pruning, int8, openvino, families, profile, finetune, merging, vlm)" >&2; exit 2 ;;
  esac
done
