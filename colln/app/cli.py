"""What every colln command shares: error reporting, exit codes, argument parsing helpers.

A :class:`CollnError` prints ``colln: error: <stage>: <message>`` and exits with its ``exit_code``
(2, or 1 for a failed validation); the traceback only with ``--verbose``. Interrupted: 130. Anything
unexpected: exit 3 and one line naming a log file with the traceback (see :func:`run_main`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields, replace
from pathlib import Path

from colln.errors import CollnError, UsageError
from colln.files import PATH_ERRNOS, display
from colln.infer.timing import MAX_ROUNDS, MIN_ROUNDS, Timing
from colln.models.config import MERGE_WEIGHTS, METRICS, ORDERS, OUTPUTS, PruneConfig

INTERRUPTED = 130
# An unexpected error (a bug): not 1 (validation failed) nor 2 (bad input).
INTERNAL_ERROR = 3
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


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


@contextlib.contextmanager
def _quiet_nncf(
    verbose: bool,
) -> Iterator[None]:
    """NNCF logs every op it leaves float at INFO, on its own handler: a command shows its warnings
    only (--verbose: everything). A filter, since importing nncf resets its logger's level."""
    logger = logging.getLogger("nncf")

    def warnings_up(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING

    if not verbose:
        logger.addFilter(warnings_up)
    try:
        yield
    finally:
        logger.removeFilter(warnings_up)


def run_main(
    main: Callable[[argparse.Namespace], int | None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` and run ``main``: the one place exit codes and error lines are made.

    0 ok; 1 validation failed (export written); 2 a CollnError, a path that cannot be used or out
    of memory (one line); 130 interrupted (SIGINT, SIGTERM, SIGHUP: temp output removed on the way out);
    INTERNAL_ERROR anything else: one line naming a log file that holds the traceback."""
    verbose = "--verbose" in (sys.argv[1:] if argv is None else argv)
    try:
        with interrupt_on_termination(), _quiet_nncf(verbose):
            args = parser.parse_args(argv)
            return int(main(args) or 0)
    except KeyboardInterrupt:
        return interrupted()
    except CollnError as exc:
        if _interrupted(exc):
            return interrupted()
        if _out_of_memory(exc):
            return out_of_memory(verbose)
        if verbose:
            traceback.print_exc()
        say_once(f"colln: error: {exc.stage}: {exc}")
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the one place an unexpected error becomes an exit code
        if _interrupted(exc):
            return interrupted()
        if _out_of_memory(exc):
            return out_of_memory(verbose)
        if not isinstance(exc, OSError) or exc.errno not in PATH_ERRNOS:
            return internal_error(parser.prog, verbose)
        if verbose:
            traceback.print_exc()
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        fix = "free some space and run it again" if full else "check the path and its permissions"
        where = f" ({display(exc.filename)})" if exc.filename else ""
        say_once(f"colln: error: system: {PATH_ERRNOS[exc.errno]}{where}: {fix}")
        return 2


def say(
    line: str,
) -> None:
    """One error line on stderr: without terminal colour codes (an exporter's message may carry
    them), and printable whatever bytes a path holds."""
    line = _ANSI.sub("", line).replace("\n", " ").strip()
    sys.stderr.write(line.encode("utf-8", errors="backslashreplace").decode("utf-8") + "\n")
    sys.stderr.flush()


def say_once(
    line: str,
) -> None:
    """:func:`say` once per run: under torchrun only the first process that fails prints the line,
    naming its rank (every rank often fails alike: the same bad --data). torchrun itself then exits
    with 1 whatever its workers' codes; its summary names each worker's exit code."""
    from colln.train.distributed import env_ranks

    ranks = env_ranks()
    if ranks.world_size > 1:
        if not _first_to_fail():
            return
        line = f"{line} (rank {ranks.rank} of {ranks.world_size})"
    say(line)


def _first_to_fail() -> bool:
    """Whether this process is the first of its torchrun workers to report an error: the first to
    create a file named after the run (torchrun's run id and port, the launching agent's pid) in
    the temp directory. A process that cannot tell reports (twice is better than never)."""
    keys = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
    run = ":".join(os.environ.get(k, "") for k in keys)
    digest = hashlib.sha256(f"{run}:{os.getppid()}".encode()).hexdigest()[:16]
    try:
        os.close(os.open(Path(tempfile.gettempdir()) / f"colln-torchrun-{digest}.failed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def interrupted() -> int:
    say_once("colln: error: interrupted")
    return INTERRUPTED


def _interrupted(
    exc: BaseException,
) -> bool:
    """Whether a KeyboardInterrupt is behind ``exc`` (a library, such as the ONNX exporter, may
    wrap Ctrl-C in its own error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


# How the runtimes say an allocation failed: ONNX Runtime's arena, C++'s operator new (OpenVINO,
# TensorRT), PyTorch's allocators.
_NO_MEMORY = re.compile(r"Failed to allocate memory|(std::)?bad_alloc|can't alloc|out of memory", re.IGNORECASE)


def _out_of_memory(
    exc: BaseException,
) -> BaseException | None:
    """The allocation failure behind ``exc`` (a MemoryError, or a runtime's own error saying so),
    itself or a cause; ``None`` if there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MemoryError) or _NO_MEMORY.search(str(exc)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def out_of_memory(
    verbose: bool,
) -> int:
    """Out of memory is what the machine allows, not a bug: one line saying what to do, exit 2."""
    if verbose:
        traceback.print_exc()
    cause = _out_of_memory(sys.exc_info()[1])
    said = _NO_MEMORY.search(str(cause))
    # From the runtime's own words on (ONNX Runtime's lines start with a source path and a signature).
    what = str(cause)[said.start() :] if said else str(cause).strip() or type(cause).__name__
    what = what.strip().splitlines()[0]
    say_once(
        f"colln: error: memory: out of memory ({what[:200]}): run it with smaller batches (or a smaller model), or "
        "free memory or raise the limit (ulimit -v, the container's memory)"
    )
    return 2


def internal_error(
    prog: str,
    verbose: bool,
) -> int:
    """A bug, not bad input: the traceback goes to a log file, the line names it."""
    exc = sys.exc_info()[1]
    text = traceback.format_exc()
    if verbose:
        sys.stderr.write(text)
    summary = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
    try:
        fd, log = tempfile.mkstemp(prefix=f"{prog}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
        with os.fdopen(fd, "w", errors="backslashreplace") as f:
            f.write(f"{prog} {' '.join(sys.argv[1:])}\n\n{text}")
        where = f"the traceback is in {log}"
    except OSError:
        where = "the traceback could not be saved: run again with --verbose"
    say_once(f"colln: error: internal: {summary[:300]} (unexpected; {where}; please report it)")
    return INTERNAL_ERROR


@contextlib.contextmanager
def interrupt_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP (docker stop, a CI time-out, a closed terminal) raise KeyboardInterrupt,
    like Ctrl-C: the same clean-up runs (temp output removed) and the exit code is 130."""

    def handler(
        signum: int,
        frame: object,
    ) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
    minimum: int | None = None,
) -> tuple[int, ...]:
    """``"3,6,9"`` -> ``(3, 6, 9)``; a clear UsageError otherwise (also below ``minimum``)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers like 3,6,9, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty: give comma-separated integers like 3,6,9")
    if minimum is not None and min(values) < minimum:
        raise UsageError(f"{what} must be integers >= {minimum}, got {text!r}")
    return values


def positive_int(
    text: str,
) -> int:
    """argparse ``type=``: an integer >= 1 (checked while parsing, before any work starts)."""
    return _int_at_least(text, 1)


def non_negative_int(
    text: str,
) -> int:
    """argparse ``type=``: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(
    text: str,
    minimum: int,
) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def add_prune_arguments(
    p: argparse.ArgumentParser,
    tokens: bool = True,
    schedule: str | None = None,
    several: bool = False,
) -> None:
    """The prune settings as options, one per :class:`PruneConfig` field and with its defaults (read
    back by :func:`prune_config`); ``tokens=False`` leaves out the vision-language token-output options.

    ``schedule``: the form of colln-eval and colln-viz, which define ``--keep`` and ``--metric``
    themselves (the values they sweep or draw): ``--layers`` may repeat and ``--schedule`` names
    block sets (this one by default); ``several``: ``--norm`` may list several orders."""
    if schedule is not None:
        _add_schedule_arguments(p, schedule, several)
        _add_rescue_fuse_arguments(p)
        return
    _add_reduction_arguments(p)
    _add_score_arguments(p)
    _add_rescue_fuse_arguments(p)
    _add_keep_count_arguments(p)
    if tokens:
        _add_token_output_arguments(p)


_NORM_HELP = f"Col-Ln norm order n (default {PruneConfig.norm:g})"


def _add_reduction_arguments(
    p: argparse.ArgumentParser,
) -> None:
    """How many tokens go, and whether they vanish or merge: --keep, --tome, --merge and its options."""
    p.add_argument(
        "--keep",
        default=None,
        help="keep rate in (0, 1], or one per pruning layer (0.8,0.7,0.6); 1.0 = unpruned baseline "
        f"(default {PruneConfig.keep:g})",
    )
    p.add_argument(
        "--tome",
        default=None,
        help="ToMe instead of pruning: merge R tokens at every block (bipartite soft matching), or one R per block "
        "(8,8,4,...); --layers then names the merging blocks (default all); R above half a block's tokens is clamped",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="the tokens a pruning layer drops join their most similar kept token (key cosine) instead of vanishing; "
        "--output tokens: PruMerge at the feature block",
    )
    p.add_argument(
        "--merge-weight",
        default=None,
        choices=MERGE_WEIGHTS,
        help="average merged tokens by size (default for logits) or by score x size (default for --output tokens)",
    )
    p.add_argument(
        "--no-prop-attn",
        dest="prop_attn",
        action="store_false",
        help="--merge / --tome: no proportional attention (log size on the attention logits) after a merge",
    )


def _add_score_arguments(
    p: argparse.ArgumentParser,
) -> None:
    """Where tokens are scored and how: one --layers set, --metric and --norm."""
    p.add_argument("--layers", default=None, help="pruning blocks, e.g. 3,6,9 (default: EViT's 3,6,9 of 12, scaled to the depth)")
    p.add_argument(
        "--metric",
        default=PruneConfig.metric,
        choices=METRICS,
        help="token score: colln (default), cls, correct ([CLS] + Col-Ln rescue)",
    )
    p.add_argument("--norm", type=float, default=PruneConfig.norm, help=_NORM_HELP)


def _add_schedule_arguments(
    p: argparse.ArgumentParser,
    schedule: str,
    several: bool,
) -> None:
    """colln-eval's and colln-viz's block sets and norms: --layers (repeatable), --schedule (default
    ``schedule``) and --norm (``several``: a list)."""
    p.add_argument(
        "--layers",
        action="append",
        default=None,
        help="pruning blocks, e.g. 0,3,6" + ("; repeat to compare several sets" if several else ""),
    )
    p.add_argument(
        "--schedule",
        default=None,
        help="named pruning blocks: evit (3,6,9 of 12) or early (0,3,6 of 12), scaled to the depth"
        f"{', comma-separated' if several else ''} (default {schedule} unless --layers is given)",
    )
    p.add_argument("--norm", default=f"{PruneConfig.norm:g}", help=_NORM_HELP + (", or several: 1,2,4" if several else ""))


def _add_rescue_fuse_arguments(
    p: argparse.ArgumentParser,
) -> None:
    """Options every form has: --rescue and --fuse."""
    p.add_argument(
        "--rescue",
        type=float,
        default=PruneConfig.rescue,
        help=f"rescue ratio c for --metric correct (default {PruneConfig.rescue:g})",
    )
    p.add_argument("--fuse", action="store_true", help="fuse the pruned tokens into one extra token (EViT)")


def _add_keep_count_arguments(
    p: argparse.ArgumentParser,
) -> None:
    """How the kept tokens are counted and ordered: --spatial-order and --round-to."""
    p.add_argument("--spatial-order", action="store_true", help="keep the kept tokens in spatial order (default: score order)")
    p.add_argument(
        "--round-to",
        type=int,
        default=PruneConfig.round_to,
        help="round keep counts up to a multiple of this, e.g. 8 (default 1: exact ceil(keep * N))",
    )


def _add_token_output_arguments(
    p: argparse.ArgumentParser,
) -> None:
    """The vision-language token outputs: --output, --feature-layer and --order."""
    p.add_argument(
        "--output",
        default=PruneConfig.output,
        choices=OUTPUTS,
        help="logits (default); tokens: a VLM vision tower returning the kept patch tokens and their patch ids "
        "(--keep is then the final rate, K = ceil(R * patches), after one rate per --layers block if any); "
        "dense: features on the full patch grid, each pruned patch with the features it had when dropped",
    )
    p.add_argument(
        "--feature-layer",
        type=int,
        default=None,
        help="--output tokens: the block whose output is returned, negative from the end (default -2, LLaVA's)",
    )
    p.add_argument("--order", default=None, choices=ORDERS, help="--output tokens: order of the tokens (default spatial)")


def prune_config(
    args: argparse.Namespace,
) -> PruneConfig:
    """The PruneConfig of the arguments :func:`add_prune_arguments` defined (option dests are the
    field names; fields a command does not offer keep their defaults)."""
    tome = None
    if args.tome is not None:
        if args.keep is not None:
            raise UsageError("--tome replaces --keep: ToMe merges R tokens per block; give one of them")
        tome = parse_ints(args.tome, "--tome", minimum=0)
        tome = tome[0] if len(tome) == 1 else tome
    _refuse_unused_options(args)
    keep = parse_floats(args.keep, "--keep") if args.keep is not None else ((1.0,) if tome is not None else (PruneConfig.keep,))
    layers = parse_ints(args.layers, "--layers") if args.layers is not None else None
    named = ("keep", "layers", "tome")
    others = [f.name for f in fields(PruneConfig) if f.name not in named and hasattr(args, f.name)]
    return PruneConfig(
        keep=keep[0] if len(keep) == 1 else keep, layers=layers, tome=tome, **{name: getattr(args, name) for name in others}
    )


def _refuse_unused_options(
    args: argparse.Namespace,
) -> None:
    """UsageError for an option given where it changes nothing (a user believes it took effect):
    the merge settings without a merge, pruning's settings with ToMe (which scores no tokens)."""
    tome = args.tome is not None
    unused = [
        message
        for message, given in (
            ("--merge-weight does nothing without --merge: add --merge, or leave it out",
             args.merge_weight is not None and not args.merge),
            ("--no-prop-attn does nothing without --merge or --tome: leave it out",
             not args.prop_attn and not (args.merge or tome)),
            (f"--metric {args.metric} does nothing with --tome (ToMe matches keys, it scores no tokens): leave it out",
             tome and args.metric != PruneConfig.metric),
            ("--round-to does nothing with --tome (ToMe merges r tokens, it has no keep counts): leave it out",
             tome and args.round_to != PruneConfig.round_to),
            ("--spatial-order does nothing with --tome (ToMe's merged tokens have no score order): leave it out",
             tome and args.spatial_order),
        )
        if given
    ]  # fmt: skip
    if unused:
        raise UsageError(unused[0])


def add_model_args(
    parser: argparse.ArgumentParser,
    default_schedule: str,
    sweep: bool,
) -> None:
    """Arguments colln-eval and colln-viz share: model, weights, where and how to prune. ``sweep``:
    several layer sets and norm orders are allowed (colln-eval) rather than one (colln-viz)."""
    parser.add_argument("model", help="timm ViT name or alias (vit_small, deit_base, ...) or digits_vit")
    parser.add_argument("--weights", default=None, help="pretrained | random | bundled | PATH (default: the model's own)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    add_prune_arguments(parser, tokens=False, schedule=default_schedule, several=sweep)


def layer_choices(
    args: argparse.Namespace,
    default: str,
) -> list[tuple[int, ...] | str]:
    """Every ``--layers`` set and every ``--schedule`` name, in order; ``default`` schedule when
    neither (names resolve against the model's depth: :func:`colln.measure.sweep.resolve_layers`)."""
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


def add_timing_arguments(
    p: argparse.ArgumentParser,
    rounds_aliases: Sequence[str] = (),
) -> None:
    """The timing options of every command that times (colln-export, colln-bench, colln-eval): one
    per :class:`Timing` field, with its defaults (read back by :func:`timing_options`).
    ``rounds_aliases``: older names of ``--rounds`` that keep working (colln-export's ``--latency-rounds``)."""
    d = Timing()
    p.add_argument(
        "--rounds",
        *rounds_aliases,
        dest="rounds",
        type=positive_int,
        default=None,
        metavar="N",
        help="timed rounds per batch size, every variant once per round in a shuffled order "
        f"(default: as many as fit in ~{d.budget_s:g} s per batch size, {MIN_ROUNDS}..{MAX_ROUNDS})",
    )
    p.add_argument(
        "--warmup",
        type=non_negative_int,
        default=None,
        metavar="N",
        help=f"untimed rounds of every variant first, per batch size (default {d.warmup}: OpenVINO compiles on its first "
        "call, ONNX Runtime grows its memory arena over the first calls at a batch size)",
    )
    p.add_argument(
        "--threads",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="intra-op threads of every runtime; 0 = the runtime's default (default: the runtime's default, as deployed; "
        "1 gives figures that do not depend on the core count)",
    )
    p.add_argument(
        "--no-split-batches",
        dest="split_batches",
        action="store_const",
        const=False,
        default=None,
        help="with 2+ threads on ONNX Runtime CPU, run every batch on the session's threads instead of one slice of "
        "the batch per thread",
    )


def timing_options(
    args: argparse.Namespace,
    like: Timing | None = None,
) -> Timing:
    """The :class:`Timing` of the options :func:`add_timing_arguments` defined: those given on the
    command line, the others from ``like`` (colln-bench ``--baseline``: the recorded case's), else
    :class:`Timing`'s defaults."""
    given = {name: getattr(args, name) for name in ("rounds", "warmup", "threads", "split_batches")}
    timing = replace(like or Timing(), **{name: value for name, value in given.items() if value is not None})
    # More threads than CPUs only oversubscribes them: the figures would measure the scheduler.
    cpus = len(os.sched_getaffinity(0))
    if timing.threads is not None and timing.threads > cpus:
        source = "--threads" if args.threads is not None else "the recorded case's thread count"
        raise UsageError(
            f"{source} {timing.threads} is more than the {cpus} CPUs this process may use: give --threads {cpus} or "
            "fewer (0: the runtime's default)"
        )
    return timing
