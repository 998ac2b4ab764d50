"""``evaluate``: sweep keep schedules over labelled images, pick within a latency budget, and write
results.json, results.md and the plots (the job behind ``colln-eval``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from colln.data import load_labelled
from colln.errors import NoFitError
from colln.export.spec import ExportSpec
from colln.files import atomic_dir, atomic_write
from colln.measure.sweep import Sweep, SweepOptions, export_command, pick, sweep
from colln.report.plots import plot_accuracy_vs_keep, plot_pareto
from colln.report.render import eval_markdown
from colln.train.distributed import env_ranks

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
KEEP_PLOT = "accuracy_vs_keep.png"
PARETO_PLOT = "accuracy_vs_latency.png"

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """A sweep written to ``out``; ``no_fit`` when a budget was asked for and nothing met it."""

    out: Path
    sweep: Sweep | None  # None on the ranks other than 0 under torchrun: they write nothing
    no_fit: NoFitError | None = None
    files: tuple[str, ...] = ()  # what was written into ``out`` (a plot that could not be drawn is not)


def evaluate(
    base: ExportSpec,
    options: SweepOptions | None = None,
    *,
    data: str = "digits",
    out: Path | None = None,
    force: bool = False,
    limit: int | None = None,
    latency_budget_ms: float | None = None,
    target_speedup: float | None = None,
) -> EvalResult:
    """Sweep ``options`` over ``base`` on labelled ``data`` (``digits`` or an ImageFolder, the first
    ``limit`` images spread evenly), pick within a budget when one is given, and write results.json,
    results.md and the two plots into ``out`` (default ``evals/<model>-<data>``), whole or not at all
    (a plot that cannot be drawn, such as accuracy against keep rate for ToMe alone, is left out
    with a warning).
    ``None`` options: :class:`SweepOptions`' defaults."""
    options = options if options is not None else SweepOptions()
    unpruned = base.load_unpruned()
    labelled = load_labelled(data, unpruned, limit)
    out = Path(out) if out is not None else Path("evals") / f"{base.model}-{labelled.name}"
    no_fit = None
    if not env_ranks().is_main:
        sweep(base, labelled, options, unpruned)
        return EvalResult(out=out, sweep=None)
    # Entered before the sweep: an existing --out fails at once, and a failed sweep leaves nothing.
    with atomic_dir(out, force=force, marker=RESULTS_JSON) as tmp:
        result = sweep(base, labelled, options, unpruned)
        if latency_budget_ms is not None or target_speedup is not None:
            try:
                best = pick(result, latency_budget_ms, target_speedup)
                why = f"best top-1 ({100 * best.accuracy:.1f}%) at {best.latency.p50_ms:.3g} ms, {result.speedup(best):.2f}x"
                command = export_command(best, base, backend=result.backend)
                result = replace(result, pick={"key": best.key, "row": best.to_dict(), "command": command, "why": why})
            except NoFitError as exc:
                no_fit = exc
        atomic_write(tmp / RESULTS_JSON, json.dumps(result.to_dict(), indent=2) + "\n")
        atomic_write(tmp / RESULTS_MD, eval_markdown(result))
        files = [RESULTS_JSON, RESULTS_MD]
        for name, plot in ((KEEP_PLOT, plot_accuracy_vs_keep), (PARETO_PLOT, plot_pareto)):
            try:
                plot(result, tmp / name)
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - a figure is a by-product: the results stand without it
                _logger.warning("%s not drawn: %s", name, exc)
            else:
                files.append(name)
    return EvalResult(out=out, sweep=result, no_fit=no_fit, files=tuple(files))
