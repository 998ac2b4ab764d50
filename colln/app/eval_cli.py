"""``colln-eval``: what a keep schedule costs in accuracy and buys in speed, on your own data.

colln-eval digits_vit --schedule early --keep 0.3,0.5,0.7 --out evals/digits
colln-eval vit_small --weights W.safetensors --data imagenet_val/ --latency-budget 12
torchrun --nproc_per_node 4 -m colln.app.eval_cli vit_small --data imagenet_val/   # images sharded, rank 0 writes
"""

from __future__ import annotations

import argparse
from pathlib import Path

from colln.app.cli import (
    ArgumentParser,
    add_model_args,
    add_timing_arguments,
    entry_point,
    layer_choices,
    parse_floats,
    parse_ints,
    parse_metrics,
    positive_int,
    timing_options,
)
from colln.errors import UsageError
from colln.export.spec import ExportSpec
from colln.jobs.evaluate import evaluate
from colln.measure.sweep import EVAL_BACKENDS, SweepOptions
from colln.models.config import METRICS, PruneConfig
from colln.report.render import print_eval

DEFAULT_SCHEDULE = "evit"  # the blocks colln-export prunes by default


def base_spec(
    args: argparse.Namespace,
) -> ExportSpec:
    return ExportSpec(
        model=args.model, weights=args.weights, img_size=args.img_size, pruning=PruneConfig(rescue=args.rescue, fuse=args.fuse)
    )


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="colln-eval",
        description="Accuracy and latency of keep schedules (metric x keep x layers) against labels and the unpruned model.",
    )
    add_model_args(parser, default_schedule=DEFAULT_SCHEDULE, sweep=True)
    parser.add_argument(
        "--data", default="digits", help="digits (bundled test split) or an ImageFolder DIR (one subfolder per class)"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate this many images, spread evenly over the set")
    parser.add_argument("--keep", default="0.3,0.5,0.7,0.9", help="keep rates to sweep (default 0.3,0.5,0.7,0.9)")
    parser.add_argument("--metric", default=",".join(METRICS), help="metrics to compare (default colln,cls,correct)")
    parser.add_argument(
        "--method",
        default="prune",
        help="token reduction methods to compare, comma-separated: prune (the metric's top-k), merge (the same top-k, "
        "dropped tokens merged into the kept ones), tome (ToMe at every block, r from --tome); default prune",
    )
    parser.add_argument("--tome", default=None, help="--method tome: the r values to sweep (default 4,8,12,16)")
    parser.add_argument(
        "--backend", default="torch", choices=EVAL_BACKENDS, help="run PyTorch, ONNX Runtime or OpenVINO exports (default torch)"
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        help="precisions to sweep, e.g. fp32,int8 (int8: static QDQ, calibrated on up to 256 of the evaluated images; "
        "needs --backend onnxruntime; default fp32)",
    )
    parser.add_argument("--batch", type=positive_int, default=64, help="batch size for accuracy (default 64)")
    parser.add_argument("--latency-batch", type=positive_int, default=1, help="batch size for latency (default 1)")
    add_timing_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--latency-budget",
        type=float,
        default=None,
        metavar="MS",
        help="pick the most accurate schedule within MS median latency",
    )
    budget.add_argument(
        "--target-speedup", type=float, default=None, metavar="X", help="pick the most accurate schedule at least X times faster"
    )
    parser.add_argument("--out", type=Path, default=None, help="output directory (default evals/<model>-<data>)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def run(
    args: argparse.Namespace,
) -> int:
    methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
    if args.tome is not None and "tome" not in methods:
        raise UsageError("--tome sets ToMe's r values and does nothing without --method tome: add tome to --method")
    options = SweepOptions(
        keeps=parse_floats(args.keep, "--keep"),
        layers=tuple(layer_choices(args, default=DEFAULT_SCHEDULE)),
        metrics=parse_metrics(args.metric),
        methods=methods,
        tome_rs=parse_ints(args.tome or "4,8,12,16", "--tome", minimum=0),
        norms=parse_floats(args.norm, "--norm"),
        precisions=tuple(p.strip() for p in args.precision.split(",")),
        backend=args.backend,
        batch=args.batch,
        latency_batch=args.latency_batch,
        timing=timing_options(args),
        device=args.device,
    )
    result = evaluate(
        base_spec(args),
        options,
        data=args.data,
        out=args.out,
        force=args.force,
        limit=args.limit,
        latency_budget_ms=args.latency_budget,
        target_speedup=args.target_speedup,
    )
    if result.sweep is None:  # torchrun: rank 0 reports
        return 0
    print_eval(result.sweep)
    print(f"wrote {result.out}/{', '.join(result.files)}")
    if result.no_fit is not None:
        raise result.no_fit
    if result.sweep.pick:
        print(f"{result.sweep.pick['why']}; reproduce with:\n{result.sweep.pick['command']}")
    return 0


main = entry_point(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
