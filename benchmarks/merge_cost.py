"""What merging costs over pruning at the same token counts, and ToMe's speedup against its bound:
ONNX Runtime exports of one model timed interleaved in one run (unpruned, Col-Ln prune,
Col-Ln + merge at the same keep plan, ToMe at each r).

    PYTHONPATH=. python benchmarks/merge_cost.py [--model digits_vit] [--weights W] [--keep 0.7] [--tome 8,13]
        [--batch 8] [--threads 1] [--json FILE]
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
from colln.infer.timing import measure
from colln.models.config import PruneConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_vit")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--tome", default="8,13")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
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
            runners[name] = stack.enter_context(open_runner(out, "onnxruntime", threads=args.threads))
        timed = measure(runners, tuple(data_config(unpruned)["input_size"]), [args.batch], rounds=args.rounds)[args.batch]
    p50 = {name: timed.stats[name].p50_ms for name in configs}
    # speedup: the median of the paired per-round ratios over the unpruned model (1.0 for itself)
    rows = {n: {"p50_ms": p50[n], "speedup": timed.speedups.get(n, (1.0,))[0], "bound": bounds[n]} for n in configs}
    print(f"{args.model}, ONNX Runtime, batch {args.batch}, {args.threads} thread(s), interleaved")
    print("| config | median ms | speedup | FLOPs bound | speedup / bound |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['p50_ms']:.3g} | {r['speedup']:.2f} | {r['bound']:.2f} | {r['speedup'] / r['bound']:.2f} |")
    print(f"\nmerge / prune latency at the same token counts: {p50['merge'] / p50['prune']:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"model": args.model, "batch": args.batch, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
