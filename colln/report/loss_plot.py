"""``loss.png``: training loss and validation accuracy per epoch, of one fine-tuning run or of
several side by side (a matplotlib Figure on the Agg canvas; written atomically)."""

from __future__ import annotations

import io
from pathlib import Path

from colln.files import atomic_write


def plot_history(
    runs: dict[str, dict],
    path: Path,
    title: str,
) -> None:
    """One panel: a line per run (``label -> finetune.json record``)."""
    plot_panels({title: runs}, path)


def plot_panels(
    panels: dict[str, dict[str, dict]],
    path: Path,
) -> None:
    """Panels side by side (``title -> {label -> finetune.json record}``): training loss (solid, left
    axis) and validation top-1 (dashed, right axis, epoch 0 = before fine-tuning), per epoch. A
    label keeps its colour across panels."""
    # A Figure on its own Agg canvas: no pyplot, so the caller's backend and figure list are untouched.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6 * len(panels), 4.2), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    colors: dict[str, str] = {}
    for loss_ax, (title, runs) in zip(axes[0], panels.items()):
        acc_ax = loss_ax.twinx()
        for label, record in runs.items():
            color = colors.setdefault(label, cycle[len(colors) % len(cycle)])
            history = record["history"]
            loss_ax.plot(
                [h["epoch"] for h in history],
                [h["train_loss"] for h in history],
                color=color,
                marker="o",
                ms=3,
                label=f"{label}: train loss",
            )
            accs = [(h["epoch"], 100 * h["val_acc"]) for h in history if h["val_acc"] is not None]
            before = record.get("accuracy", {}).get("before")
            if accs and before is not None:
                accs.insert(0, (0, 100 * before))
            if accs:
                acc_ax.plot(*zip(*accs), color=color, ls="--", marker="s", ms=3, alpha=0.6, label=f"{label}: val top-1")
        loss_ax.set_xlabel("epoch")
        loss_ax.set_ylabel("training loss")
        acc_ax.set_ylabel("validation top-1 (%)")
        loss_ax.set_title(title, fontsize=9)
        loss_ax.grid(alpha=0.3)
        handles, labels = loss_ax.get_legend_handles_labels()
        more_handles, more_labels = acc_ax.get_legend_handles_labels()
        loss_ax.legend(
            handles + more_handles, labels + more_labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2
        )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())
