"""``colln-eval``: what a keep schedule costs in accuracy and buys in speed, on your own data.

    colln-eval digits_vit --schedule early --keep 0.3,0.5,0.7 --out evals/digits
    colln-eval vit_small --weights W.safetensors --data imagenet_val/ --latency-budget 12
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from colln.app.cli import ArgumentParser, parse_floats, parse_ints, run_main
from colln.errors import UsageError
from colln.export.pipeline import atomic_output
from colln.export.spec import ExportSpec
from colln.models.config import METRICS
from colln.runtime import evaluate as ev

DEFAULT_SCHEDULE = "evit"  # the blocks colln-export prunes by default


def add_model_args(
    parser: argparse.ArgumentParser,
    default_schedule: str,
    sweep: bool,
) -> None:
    """Arguments colln-eval and colln-viz share: model, weights, where and how to prune. ``sweep``:
    several layer sets and norm orders are allowed (colln-eval) rather than one (colln-viz)."""
    several = ", comma-separated" if sweep else ""
    parser.add_argument("model", help="timm ViT name or alias (vit_small, deit_base, ...) or digits_vit")
    parser.add_argument("--weights", default=None, help="pretrained | random | bundled | PATH (default: the model's own)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument(
        "--layers",
        action="append",
        default=None,
        help="pruning blocks, e.g. 0,3,6" + ("; repeat to compare several sets" if sweep else ""),
    )
    parser.add_argument(
        "--schedule",
        default=None,
        help=f"named pruning blocks: evit (3,6,9 of 12) or early (0,3,6 of 12), scaled to the depth{several} "
        f"(default {default_schedule} unless --layers is given)",
    )
    parser.add_argument("--norm", default="4", help="Col-Ln norm order n (default 4)" + (", or several: 1,2,4" if sweep else ""))
    parser.add_argument("--rescue", type=float, default=0.2, help="rescue ratio of the 'correct' metric (default 0.2)")
    parser.add_argument("--fuse", action="store_true", help="fuse the pruned tokens into one (EViT)")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")


def layer_sets(
    args: argparse.Namespace,
    depth: int,
    default: str,
) -> list[tuple[int, ...]]:
    """Every ``--layers`` set and every ``--schedule``, in order; ``default`` schedule when neither."""
    sets = [parse_ints(text, "--layers") for text in args.layers or ()]
    schedules = args.schedule.split(",") if args.schedule else ([] if sets else [default])
    sets += [ev.schedule_layers(s.strip(), depth) for s in schedules]
    return list(dict.fromkeys(sets))


def parse_metrics(
    text: str,
) -> tuple[str, ...]:
    metrics = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise UsageError(f"unknown metric {bad[0] if bad else text!r}: choose from {','.join(METRICS)}")
    return metrics


def base_spec(
    args: argparse.Namespace,
) -> ExportSpec:
    return ExportSpec(model=args.model, weights=args.weights, img_size=args.img_size, rescue=args.rescue, fuse=args.fuse)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="colln-eval",
        description="Accuracy and latency of keep schedules (metric x keep x layers) against labels and the unpruned model.",
    )
    add_model_args(parser, default_schedule=DEFAULT_SCHEDULE, sweep=True)
    parser.add_argument("--data", default="digits", help="digits (bundled test split) or an ImageFolder DIR (one subfolder per class)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate this many images, spread evenly over the set")
    parser.add_argument("--keep", default="0.3,0.5,0.7,0.9", help="keep rates to sweep (default 0.3,0.5,0.7,0.9)")
    parser.add_argument("--metric", default=",".join(METRICS), help="metrics to compare (default colln,cls,correct)")
    parser.add_argument("--backend", default="torch", choices=ev.EVAL_BACKENDS, help="run PyTorch or ONNX Runtime exports (default torch)")
    parser.add_argument("--batch", type=int, default=64, help="batch size for accuracy (default 64)")
    parser.add_argument("--latency-batch", type=int, default=1, help="batch size for latency (default 1)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per configuration (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of ONNX Runtime / PyTorch (default: their own)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--latency-budget", type=float, default=None, metavar="MS", help="pick the most accurate schedule within MS median latency")
    budget.add_argument("--target-speedup", type=float, default=None, metavar="X", help="pick the most accurate schedule at least X times faster")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default evals/<model>-<data>)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def main_args(
    args: argparse.Namespace,
) -> int:
    keeps = parse_floats(args.keep, "--keep")
    norms = parse_floats(args.norm, "--norm")
    metrics = parse_metrics(args.metric)
    spec = base_spec(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    unpruned = spec.load_unpruned()
    sets = layer_sets(args, len(unpruned.blocks), default=DEFAULT_SCHEDULE)
    data = ev.load_data(args.data, unpruned.num_classes, args.limit)
    out = args.out or Path("evals") / f"{args.model}-{data.name}"
    no_fit = None
    # Entered before the sweep: an existing --out fails at once, and a failed sweep leaves nothing.
    with atomic_output(out, force=args.force) as tmp:
        result = ev.sweep(
            spec,
            data,
            keeps=keeps,
            layer_sets=sets,
            metrics=metrics,
            norms=norms,
            backend=args.backend,
            batch=args.batch,
            latency_batch=args.latency_batch,
            rounds=args.rounds,
            warmup=args.warmup,
            threads=args.threads,
            device=args.device,
            unpruned=unpruned,
        )
        if args.latency_budget is not None or args.target_speedup is not None:
            try:
                best = ev.pick(result, args.latency_budget, args.target_speedup)
                why = f"best top-1 ({100 * best.accuracy:.1f}%) at {best.latency.p50_ms:.3g} ms, {result.speedup(best):.2f}x"
                result = replace(result, pick={"key": best.key, "row": best.to_dict(), "command": ev.export_command(best, spec), "why": why})
            except ev.NoFitError as exc:
                no_fit = exc
        ev.write_outputs(result, tmp)
    ev.print_rich(result)
    print(f"wrote {out}/{ev.RESULTS_JSON}, {ev.RESULTS_MD}, {ev.KEEP_PLOT}, {ev.PARETO_PLOT}")
    if no_fit is not None:
        raise no_fit
    if result.pick:
        print(f"{result.pick['why']}; reproduce with:\n{result.pick['command']}")
    return 0


def main(
    argv: Sequence[str] | None = None,
) -> int:
    return run_main(main_args, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
