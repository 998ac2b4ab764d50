"""LLaVA-1.5's vision tower as a tokens export: ``vit_large_patch14_clip_336`` (random weights, offline)
cut at block -2, returning K = 192 of 576 patch tokens, timed against the unpruned tower cut at the
same block (all 576 tokens), interleaved, batch 1, ONNX Runtime CPU.

    PYTHONPATH=. python benchmarks/vlm.py [--rounds 5] [--warmup N] [--threads N] [--val-limit 2]
        [--out benchmarks/results/vlm_clip_l336.json]
As ``benchmarks/run_all.sh vlm`` runs it: ``PYTHONPATH=. python benchmarks/vlm.py --rounds 5 --val-limit 2``.

Two exports through ``colln.export_model`` (the ~1.2 GB graphs go under ``exports/``, ignored by git):
the final selection alone (``--keep 0.3333``: K = 192, the encoder runs 23 full blocks), and the same
with inner pruning at three early blocks (``--keep 0.7,0.7,0.7,0.3333 --layers 2,4,6``:
577 -> 404 -> 283 -> 199 tokens, then 192). Bounded: ``--rounds`` timing rounds after colln-export's
warm-up (``--warmup``) and ``--val-limit`` photos for the ONNX Runtime vs PyTorch check (random weights: near-ties expected).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import colln
from colln.export.spec import ExportSpec
from colln.infer.timing import Timing
from colln.jobs.export import ExportOptions, LatencyOptions, ValidationOptions, export_model
from colln.models.config import PruneConfig

MODEL = "vit_large_patch14_clip_336"
CASES = {
    "final-only": PruneConfig(keep=0.3333, output="tokens"),
    "inner-L2-4-6+final": PruneConfig(keep=(0.7, 0.7, 0.7, 0.3333), layers=(2, 4, 6), output="tokens"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="a ViT-L/336 round takes ~20 s on 2 vCPUs")
    parser.add_argument("--warmup", type=int, default=Timing.warmup)
    parser.add_argument("--val-limit", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lm-params", type=float, default=7e9)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vlm_clip_l336.json"))
    args = parser.parse_args()
    # Cases run earlier stay in the file: each case is bounded and can be re-run on its own.
    earlier = json.loads(args.out.read_text())["cases"] if args.out.is_file() else {}
    results = {"model": MODEL, "weights": "random", "cases": earlier}
    options = ExportOptions(
        force=True,
        validation=ValidationOptions(limit=args.val_limit),
        latency=LatencyOptions(batches=(1,), timing=Timing(rounds=args.rounds, warmup=args.warmup, threads=args.threads)),
        lm_params=args.lm_params,
    )
    for name in args.cases.split(","):
        spec = ExportSpec(MODEL, weights="random", pruning=CASES[name])
        start, load = time.perf_counter(), os.getloadavg()
        result = export_model(spec, Path("exports") / f"{MODEL}-tokens-{name}", options)
        r = result.report
        v, lat = r["validation"], r["latency"]["batches"]["1"]
        results["cases"][name] = {
            "command": f"colln-export {MODEL} --weights random --output tokens --keep "
            + ",".join(f"{k:g}" for k in (spec.pruning.keep if isinstance(spec.pruning.keep, tuple) else (spec.pruning.keep,)))
            + ("" if spec.pruning.layers is None else " --layers " + ",".join(map(str, spec.pruning.layers)))
            + f" --val-limit {args.val_limit} --latency-batches 1 --latency-rounds {args.rounds}",
            "plan": r["plan"]["summary"],
            "topk_k": r["export"]["topk_k"],
            "onnx_bytes": r["export"]["onnx_bytes"],
            "tokens": r["tokens"],
            "flops": r["flops"],
            "latency_b1": {
                "pruned_p50_ms": lat["pruned"]["p50_ms"],
                "unpruned_p50_ms": lat["unpruned"]["p50_ms"],
                "rounds": lat["pruned"]["rounds"],
                "speedup": lat["speedup"],
                "speedup_iqr": lat["speedup_iqr"],
            },
            "validation": {k: v[k] for k in ("passed", "images", "judged_images", "max_abs_error", "min_cosine", "warnings")},
            "kept_sets": [
                {k: layer[k] for k in ("layer", "k", "identical_fraction", "min_relative_margin")} for layer in v["layers"]
            ],
            "environment": r["environment"],
            "loadavg_before": load,
            "wall_s": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(results["cases"][name], indent=1), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**results, "colln": colln.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
