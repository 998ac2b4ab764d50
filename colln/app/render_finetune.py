"""``loss.png``: training loss and validation accuracy per epoch, of one fine-tuning run or of
several side by side (matplotlib, Agg; written atomically)."""

from __future__ import annotations

import io
from pathlib import Path

from colln.files import atomic_write


def plot_history(
    runs: dict[str, dict],
    path: Path,
    title: str,
) -> None:
    """One line per run (``label -> finetune.json record``): training loss (solid, left axis) and
    validation top-1 (dashed, right axis), per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, loss_ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    acc_ax = loss_ax.twinx()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, record) in enumerate(runs.items()):
        history = record["history"]
        epochs = [h["epoch"] for h in history]
        color = colors[i % len(colors)]
        loss_ax.plot(epochs, [h["train_loss"] for h in history], color=color, marker="o", ms=3, label=f"{label}: train loss")
        accs = [(h["epoch"], 100 * h["val_acc"]) for h in history if h["val_acc"] is not None]
        before = record.get("accuracy", {}).get("before")
        if accs and before is not None:
            accs.insert(0, (0, 100 * before))
        if accs:
            acc_ax.plot(*zip(*accs), color=color, ls="--", marker="s", ms=3, label=f"{label}: val top-1")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    acc_ax.set_ylabel("validation top-1 (%)")
    loss_ax.set_title(title, fontsize=10)
    lines = loss_ax.get_legend_handles_labels()
    more = acc_ax.get_legend_handles_labels()
    loss_ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center right")
    loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
