"""What every colln command shares: error reporting, exit codes, argument parsing helpers.

A :class:`CollnError` prints ``colln: error: <stage>: <message>`` and exits with its ``exit_code``
(2, or 1 for a failed validation); the traceback only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from colln.errors import CollnError, UsageError
from colln.models.config import METRICS, ORDERS, OUTPUTS, PruneConfig


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments in colln's one-line error format (exit 2) and gives
    every command ``--verbose`` (tracebacks on errors)."""

    def __init__(
        self,
        *args: object,
        **kwargs: object,
    ) -> None:
        # "resolve": a command may redefine --verbose with its own help text.
        super().__init__(*args, conflict_handler="resolve", **kwargs)  # type: ignore[arg-type]
        self.add_argument("--verbose", action="store_true", help="show tracebacks on errors")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def run_main(
    main: Callable[[argparse.Namespace], int | None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` and run ``main``; turn CollnError into colln's error line and exit code."""
    verbose = "--verbose" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        return int(main(args) or 0)
    except CollnError as exc:
        if verbose:
            traceback.print_exc()
        print(f"colln: error: {exc.stage}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("colln: error: interrupted", file=sys.stderr)
        return 130


def entry_point(
    build_parser: Callable[[], argparse.ArgumentParser],
    handler: Callable[[argparse.Namespace], int | None],
) -> Callable[[Sequence[str] | None], int]:
    """A command's ``main(argv=None) -> exit code``: parse with ``build_parser()``, run ``handler``."""

    def main(argv: Sequence[str] | None = None) -> int:
        return run_main(handler, build_parser(), argv)

    return main


def parse_floats(
    text: str,
    what: str,
) -> tuple[float, ...]:
    """``"0.5,0.7"`` -> ``(0.5, 0.7)``; a clear UsageError otherwise."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{what} must be a number or comma-separated numbers, got {text!r}") from None
    return values


def parse_ints(
    text: str,
    what: str,
) -> tuple[int, ...]:
    """``"3,6,9"`` -> ``(3, 6, 9)``; a clear UsageError otherwise."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers like 3,6,9, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty: give comma-separated integers like 3,6,9")
    return values


def add_prune_arguments(
    p: argparse.ArgumentParser,
) -> None:
    """The prune settings as options, one per :class:`PruneConfig` field (read back by :func:`prune_config`)."""
    p.add_argument(
        "--keep",
        default=str(PruneConfig.keep),
        help="keep rate in (0, 1], or one per pruning layer (0.8,0.7,0.6); 1.0 = unpruned baseline (default %(default)s)",
    )
    p.add_argument("--layers", default=None, help="pruning blocks, e.g. 3,6,9 (default: EViT's 3,6,9 of 12, scaled to the depth)")
    p.add_argument(
        "--metric",
        default=PruneConfig.metric,
        choices=METRICS,
        help="token score: colln (default), cls, correct ([CLS] + Col-Ln rescue)",
    )
    p.add_argument("--norm", type=float, default=PruneConfig.norm, help="Col-Ln norm order n (default %(default)g)")
    p.add_argument(
        "--rescue", type=float, default=PruneConfig.rescue, help="rescue ratio c for --metric correct (default %(default)g)"
    )
    p.add_argument("--fuse", action="store_true", help="fuse the pruned tokens into one extra token (EViT)")
    p.add_argument("--spatial-order", action="store_true", help="keep the kept tokens in spatial order (default: score order)")
    p.add_argument(
        "--round-to",
        type=int,
        default=PruneConfig.round_to,
        help="round keep counts up to a multiple of this, e.g. 8 (default 1: exact ceil(keep * N))",
    )
    p.add_argument(
        "--output",
        default=PruneConfig.output,
        choices=OUTPUTS,
        help="logits (default), or tokens: a VLM vision tower returning the kept patch tokens and their patch ids; "
        "--keep is then the final rate (K = ceil(R * patches)), after one rate per --layers block if any",
    )
    p.add_argument(
        "--feature-layer",
        type=int,
        default=None,
        help="--output tokens: the block whose output is returned, negative from the end (default -2, LLaVA's)",
    )
    p.add_argument(
        "--merge", action="store_true", help="--output tokens: each kept token absorbs its most similar pruned ones (PruMerge)"
    )
    p.add_argument("--order", default=None, choices=ORDERS, help="--output tokens: order of the tokens (default spatial)")


def prune_config(
    args: argparse.Namespace,
) -> PruneConfig:
    """The PruneConfig of the arguments :func:`add_prune_arguments` defined."""
    keep = parse_floats(args.keep, "--keep")
    return PruneConfig(
        keep=keep[0] if len(keep) == 1 else keep,
        layers=parse_ints(args.layers, "--layers") if args.layers is not None else None,
        metric=args.metric,
        norm=args.norm,
        rescue=args.rescue,
        fuse=args.fuse,
        spatial_order=args.spatial_order,
        round_to=args.round_to,
        output=args.output,
        feature_layer=args.feature_layer,
        merge=args.merge,
        order=args.order,
    )


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


def layer_choices(
    args: argparse.Namespace,
    default: str,
) -> list[tuple[int, ...] | str]:
    """Every ``--layers`` set and every ``--schedule`` name, in order; ``default`` schedule when
    neither (names resolve against the model's depth: :func:`colln.runtime.evaluate.resolve_layers`)."""
    sets: list[tuple[int, ...] | str] = [parse_ints(text, "--layers") for text in args.layers or ()]
    schedules = args.schedule.split(",") if args.schedule else ([] if sets else [default])
    return sets + [s.strip() for s in schedules]


def parse_metrics(
    text: str,
) -> tuple[str, ...]:
    metrics = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise UsageError(f"unknown metric {bad[0] if bad else text!r}: choose from {','.join(METRICS)}")
    return metrics
