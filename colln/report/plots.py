"""matplotlib figures: the evaluation plots and the kept-patch figure (colln-viz). Drawn on Agg
canvases of their own (no backend switched), written atomically."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from colln.files import atomic_write
from colln.measure.sweep import METRIC_LABELS, Sweep, pareto_front
from colln.report.render import series_label
from colln.report.viz import MetricView, overlay

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def figure(
    **kwargs: object,
) -> Figure:
    """A matplotlib Figure on its own Agg canvas: nothing process-wide is switched (matplotlib's
    backend stays the caller's; no pyplot and its open-figure registry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save(
    fig: Figure,
    path: Path,
    dpi: int = 110,
) -> None:
    """Save a figure as PNG, whole or not at all."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write(path, buffer.getvalue())


def plot_accuracy_vs_keep(
    result: Sweep,
    path: Path,
) -> None:
    """One panel per layer set: accuracy against keep rate, one line per metric, unpruned dashed."""
    sets = result.layer_sets
    if not sets:
        raise ValueError("the sweep has no keep schedule (--method tome alone): nothing to draw against the keep rate")
    fig = figure(figsize=(5.2 * len(sets), 4.2))
    axes = fig.subplots(1, len(sets), squeeze=False, sharey=True)
    norms = [n for _, n, _ in result.series()]
    for ax, layers in zip(axes[0], sets):
        for metric, norm, precision in result.series():
            rows = [
                r for r in result.keep_rows if (r.series_name, r.norm, r.precision, r.layers) == (metric, norm, precision, layers)
            ]
            xs, ys = zip(*sorted((r.keep, 100 * r.accuracy) for r in rows))
            style = "-" if precision == "fp32" else ":"
            ax.plot(xs, ys, style, marker="o", label=series_label(metric, norm, norms, precision))
        ax.axhline(100 * result.baseline.accuracy, color="grey", linestyle="--", label="unpruned")
        ax.set_title(f"pruning at blocks {', '.join(map(str, layers))}")
        ax.set_xlabel("keep rate per pruning block")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][0].legend(loc="lower right")
    fig.suptitle(f"{result.model} ({result.weights} weights), {result.num_images} {result.data} images")
    fig.tight_layout()
    save(fig, path)


def plot_pareto(
    result: Sweep,
    path: Path,
) -> None:
    """Accuracy against measured median latency: every configuration, the unpruned point, and the
    Pareto front through them."""
    from matplotlib import rcParams

    fig = figure(figsize=(7.5, 5))
    ax = fig.subplots()
    norms = [n for _, n, _ in result.series()]
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    markers = dict(zip(result.layer_sets, "osD^v<>p"))
    annotate = len(result.layer_sets) == 1
    # One colour per series (ToMe's: one per precision), each configuration a point.
    series = result.series() + list(dict.fromkeys(("tome", r.norm, r.precision) for r in result.tome_rows))
    for (metric, norm, precision), color in zip(series, colors * 3):
        ax.scatter([], [], color=color, label=series_label(metric, norm, norms, precision))
        for r in (r for r in result.rows if (r.series_name, r.norm, r.precision) == (metric, norm, precision)):
            ax.scatter(
                r.latency.p50_ms, 100 * r.accuracy, color=color, marker="X" if r.method == "tome" else markers.get(r.layers, "o")
            )
            if annotate or r.method == "tome":
                ax.annotate(
                    f"r={r.r}" if r.method == "tome" else f"{r.keep:g}",
                    (r.latency.p50_ms, 100 * r.accuracy),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=7,
                    color=color,
                )
    if not annotate:
        for layers, marker in markers.items():
            ax.scatter([], [], color="grey", marker=marker, label=f"blocks {','.join(map(str, layers))}")
    base = result.baseline
    ax.scatter([base.latency.p50_ms], [100 * base.accuracy], marker="*", s=180, color="black", label="unpruned", zorder=3)
    front = pareto_front([(r.latency.p50_ms, 100 * r.accuracy) for r in (*result.rows, base)])
    ax.step(*zip(*front), where="post", color="grey", alpha=0.6, label="Pareto front")
    ax.set_xlabel(f"median latency (ms, batch {base.latency.batch}, {result.backend} on {result.device})")
    ax.set_ylabel("top-1 accuracy (%)")
    where = f"; labels: keep rate, blocks {','.join(map(str, result.layer_sets[0]))}" if annotate else ""
    ax.set_title(f"{result.model} ({result.weights} weights): accuracy vs latency{where}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save(fig, path)


def kept_figure(
    img: np.ndarray,
    views: Sequence[MetricView],
    grid: tuple[int, int],
    title: str,
    out: Path,
    dpi: int = 100,
) -> None:
    """Rows: metrics; columns: the input, then each pruning block. Written atomically to ``out``."""
    cols = 1 + max(len(v.kept) for v in views)
    fig = figure(figsize=(2.6 * cols, 2.75 * len(views) + 0.6))
    axes = fig.subplots(len(views), cols, squeeze=False)
    total = grid[0] * grid[1]
    for row, v in zip(axes, views):
        row[0].imshow(img, interpolation="nearest")
        row[0].set_title("input", fontsize=9)
        row[0].set_ylabel(f"{METRIC_LABELS.get(v.metric, v.metric)}\npredicts {v.predicted}", fontsize=10)
        for ax, (layer, kept) in zip(row[1:], v.kept):
            ax.imshow(overlay(img, kept, grid), interpolation="nearest")
            ax.set_title(f"after block {layer}: {len(kept)}/{total} patches", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in row[1 + len(v.kept) :]:
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, out, dpi=dpi)
