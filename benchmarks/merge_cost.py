"""What merging costs over pruning at the same token counts, and ToMe's speedup against its bound:
ONNX Runtime exports of one model timed interleaved in one run (unpruned, Col-Ln prune,
Col-Ln + merge at the same keep plan, ToMe at each r).

    PYTHONPATH=. python benchmarks/merge_cost.py [--model digits_vit] [--weights W] [--keep 0.7] [--tome 8,13]
        [--batch 8] [--threads 1] [--rounds N] [--warmup N] [--json FILE]
``benchmarks/run_all.sh merging`` runs it as docs/merging.md says, e.g.
    PYTHONPATH=. python benchmarks/merge_cost.py --model vit_base --weights random --tome 8,13 --batch 8 --threads 1 \\
        --rounds 15 --json benchmarks/results/merge_cost_vit_base.json

Speedups are the median of the paired per-round ratios over the unpruned graph (colln-bench's
statistic), with their interquartile range.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

from colln.app.cli import parse_ints
from colln.data import data_config
from colln.export.artifact import export_into
from colln.export.spec import ExportSpec
from colln.infer.runners import open_runner
from colln.infer.timing import Timing, measure, paired_speedup
from colln.models.config import PruneConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_vit")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--tome", default="8,13")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="the figures in docs/merging.md are 1-thread ones")
    parser.add_argument("--rounds", type=int, default=None, help="default: as many as fit in ~20 s")
    parser.add_argument("--warmup", type=int, default=Timing.warmup)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    timing = Timing(rounds=args.rounds, warmup=args.warmup, threads=args.threads)
    base = ExportSpec(args.model, weights=args.weights)
    configs = {
        "unpruned": PruneConfig(keep=1.0),
        "prune": PruneConfig(keep=args.keep),
        "merge": PruneConfig(keep=args.keep, merge=True),
        **{f"tome{r}": PruneConfig(keep=1.0, tome=r) for r in parse_ints(args.tome, "--tome")},
    }
    unpruned = base.load_unpruned()
    with tempfile.TemporaryDirectory(prefix="colln-merge-cost-") as scratch, contextlib.ExitStack() as stack:
        runners, bounds = {}, {}
        for name, config in configs.items():
            out = Path(scratch) / name
            out.mkdir()
            exported = export_into(ExportSpec(base.model, weights=base.weights, pruning=config), out, unpruned=unpruned)
            bounds[name] = exported.plan.flops().bound
            runners[name] = stack.enter_context(
                open_runner(out, "onnxruntime", threads=timing.threads, split_batches=timing.split_batches)
            )
        timed = measure(runners, tuple(data_config(unpruned)["input_size"]), [args.batch], timing)[args.batch]
    rows = {}
    for name in configs:
        speedup, q25, q75 = timed.speedups.get(name, (1.0, 1.0, 1.0))
        rows[name] = {"p50_ms": timed.stats[name].p50_ms, "speedup": speedup, "speedup_iqr": [q25, q75], "bound": bounds[name]}
    # merge against prune at the same token counts, paired the same way (prune's time over merge's).
    merge_over_prune = paired_speedup(timed.times["prune"], timed.times["merge"])
    print(f"{args.model}, ONNX Runtime, batch {args.batch}, interleaved, {timing.describe()}")
    print("| config | median ms | speedup (IQR) | FLOPs bound | speedup / bound |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        iqr = f"{r['speedup_iqr'][0]:.2f}-{r['speedup_iqr'][1]:.2f}"
        print(f"| {name} | {r['p50_ms']:.3g} | {r['speedup']:.2f} ({iqr}) | {r['bound']:.2f} | {r['speedup'] / r['bound']:.2f} |")
    print(f"\nmerge / prune latency at the same token counts: {1 / merge_over_prune[0]:.3f} (paired median)")
    if args.json is not None:
        data = {"model": args.model, "batch": args.batch, "timing": timing.to_dict(), "rows": rows}
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
