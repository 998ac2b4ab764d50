"""Accuracy / latency sweeps of keep schedules: what each (metric, keep, layers) costs in accuracy
and buys in speed, the paper-shaped table, the plots, and the budget picker.

Every configuration runs through the same runner protocol (PyTorch or an ONNX Runtime export), so
accuracy and latency come from the very models a user would ship. Latency is measured with all
configurations interleaved (:func:`colln.runtime.bench.interleaved_latency`), the unpruned model
among them, so speedups are ratios taken under the same machine load.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from polygraphy.backend.base import BaseRunner
from torch import nn

from colln.data import DataError, data_config, image_folder, preprocess
from colln.errors import CollnError, UsageError
from colln.export.spec import INPUT_NAME, ONNX_FILE, ExportSpec
from colln.models import digits
from colln.models.plan import KeepPlan, default_layers
from colln.models.registry import default_weights
from colln.models.rewrite import get_plan
from colln.runtime import runners as rt
from colln.runtime.bench import LatencyStats, interleaved_latency

SCHEDULES = ("evit", "early")
EVAL_BACKENDS = ("torch", "onnxruntime")
# The paper's early-pruning setting for a 12-block ViT; scaled to other depths like default_layers.
EARLY_BLOCKS_OF_12 = (0, 3, 6)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
KEEP_PLOT = "accuracy_vs_keep.png"
PARETO_PLOT = "accuracy_vs_latency.png"
METRIC_LABELS = {"colln": "Col-Ln", "cls": "[CLS]", "correct": "[CLS]+Col-Ln rescue", "none": "unpruned"}


class NoFitError(CollnError):
    """No configuration of the sweep meets the latency budget or speedup target."""

    stage = "pick"


def early_layers(
    depth: int,
) -> tuple[int, ...]:
    """The paper's early pruning (blocks 0, 3, 6 of 12) scaled to ``depth``."""
    return tuple(sorted({min(depth - 1, round(depth * b / 12)) for b in EARLY_BLOCKS_OF_12}))


def schedule_layers(
    schedule: str,
    depth: int,
) -> tuple[int, ...]:
    """Pruning blocks of a named schedule: ``evit`` (3, 6, 9 of 12) or ``early`` (0, 3, 6 of 12)."""
    if schedule == "evit":
        return default_layers(depth)
    if schedule == "early":
        return early_layers(depth)
    raise UsageError(f"unknown schedule {schedule!r}: choose {' or '.join(SCHEDULES)}, or give --layers a,b,c")


@dataclass(frozen=True)
class EvalData:
    """Images with labels in the model's class indices."""

    name: str
    images: list[Image.Image]
    labels: np.ndarray


def load_data(
    data: str,
    num_classes: int,
    limit: int | None = None,
) -> EvalData:
    """``digits`` (the bundled test split) or an ImageFolder directory.

    ImageFolder classes named by integers (``0/``, ``1/``, ...) are those class indices of the model;
    otherwise the sorted class names are indices 0, 1, ... (torchvision's convention, which is
    ImageNet's order for its synset folders). ``limit`` takes that many images evenly spread over
    the set, so every class stays represented.
    """
    if data == "digits":
        split = digits.load_split("test")
        images, labels, name = split.images, split.labels, "digits"
    else:
        images, labels, classes = image_folder(Path(data))
        if all(c.isdigit() for c in classes):
            labels = np.asarray([int(classes[i]) for i in labels], dtype=np.int64)
        name = Path(data).resolve().name
    if labels.max() >= num_classes:
        raise DataError(f"class index {int(labels.max())} in {data} is beyond the model's {num_classes} classes: check the class folders")
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit {limit} must be a positive number of images")
        if limit < len(images):
            chosen = np.linspace(0, len(images) - 1, limit).round().astype(int)
            images, labels = [images[i] for i in chosen], labels[chosen]
    return EvalData(name=name, images=list(images), labels=np.asarray(labels, dtype=np.int64))


@dataclass(frozen=True)
class Row:
    """One measured configuration. ``metric`` is ``none`` for the unpruned model."""

    metric: str
    norm: float
    keep: float
    layers: tuple[int, ...]
    keep_counts: tuple[int, ...]
    flops_ratio: float
    accuracy: float
    agreement: float
    latency: LatencyStats

    @property
    def key(self) -> str:
        return f"{self.metric}-n{self.norm:g}-keep{self.keep:g}-L{'.'.join(map(str, self.layers))}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"], out["keep_counts"] = list(self.layers), list(self.keep_counts)
        out["latency"] = self.latency.to_dict()
        return out

    @classmethod
    def from_dict(
        cls,
        data: dict,
    ) -> Row:
        return cls(
            **{k: v for k, v in data.items() if k not in ("layers", "keep_counts", "latency", "speedup")},
            layers=tuple(data["layers"]),
            keep_counts=tuple(data["keep_counts"]),
            latency=LatencyStats(**data["latency"]),
        )


@dataclass(frozen=True)
class Sweep:
    """Every configuration of one sweep and the unpruned baseline, measured on the same images."""

    model: str
    weights: str
    data: str
    num_images: int
    backend: str
    device: str
    baseline: Row
    rows: tuple[Row, ...]
    pick: dict | None = field(default=None)

    def speedup(
        self,
        row: Row,
    ) -> float:
        """Unpruned median latency / this row's median latency (same run, same load)."""
        return self.baseline.latency.p50_ms / row.latency.p50_ms

    @property
    def keeps(self) -> list[float]:
        return sorted({r.keep for r in self.rows})

    @property
    def layer_sets(self) -> list[tuple[int, ...]]:
        return list(dict.fromkeys(r.layers for r in self.rows))

    def series(self) -> list[tuple[str, float]]:
        """(metric, norm) pairs in sweep order: one table row / plot line each."""
        return list(dict.fromkeys((r.metric, r.norm) for r in self.rows))

    def find(
        self,
        metric: str,
        norm: float,
        keep: float,
        layers: tuple[int, ...],
    ) -> Row | None:
        return next((r for r in self.rows if (r.metric, r.norm, r.keep, r.layers) == (metric, norm, keep, layers)), None)

    def to_dict(self) -> dict:
        rows = [{**r.to_dict(), "speedup": self.speedup(r)} for r in self.rows]
        return {
            "model": self.model,
            "weights": self.weights,
            "data": self.data,
            "num_images": self.num_images,
            "backend": self.backend,
            "device": self.device,
            "baseline": self.baseline.to_dict(),
            "rows": rows,
            "pick": self.pick,
        }

    @classmethod
    def from_dict(
        cls,
        data: dict,
    ) -> Sweep:
        return cls(
            model=data["model"],
            weights=data["weights"],
            data=data["data"],
            num_images=data["num_images"],
            backend=data["backend"],
            device=data["device"],
            baseline=Row.from_dict(data["baseline"]),
            rows=tuple(Row.from_dict(r) for r in data["rows"]),
            pick=data.get("pick"),
        )


def configurations(
    base: ExportSpec,
    keeps: Sequence[float],
    layer_sets: Sequence[tuple[int, ...]],
    metrics: Sequence[str],
    norms: Sequence[float],
) -> list[ExportSpec]:
    """One spec per (layers, metric, norm, keep). [CLS] attention has no norm order: it gets one
    row (at the first norm) instead of identical copies."""
    specs = []
    for layers in layer_sets:
        for metric in metrics:
            for norm in norms[:1] if metric == "cls" else norms:
                specs.extend(replace(base, keep=float(k), layers=tuple(layers), metric=metric, norm=float(norm)) for k in keeps)
    return specs


def _runner(
    spec: ExportSpec,
    unpruned: nn.Module,
    backend: str,
    scratch: Path,
    threads: int | None,
    device: str,
) -> tuple[BaseRunner, KeepPlan]:
    """The runner of one configuration and its keep plan."""
    if backend == "torch":
        pruned = spec.prune(unpruned)
        return rt.TorchRunner(pruned, tuple(data_config(unpruned)["input_size"]), device=device), get_plan(pruned)
    if backend == "onnxruntime":
        from colln.export.pipeline import export_into

        directory = Path(tempfile.mkdtemp(dir=scratch))
        exported = export_into(spec, directory, unpruned=unpruned)
        return rt.onnxruntime_runner(directory / ONNX_FILE, device=device, threads=threads), exported.plan
    raise UsageError(f"unknown backend {backend!r}: colln-eval runs {' or '.join(EVAL_BACKENDS)}")


def sweep(
    base: ExportSpec,
    data: EvalData,
    keeps: Sequence[float],
    layer_sets: Sequence[tuple[int, ...]],
    metrics: Sequence[str],
    norms: Sequence[float],
    backend: str = "torch",
    batch: int = 64,
    latency_batch: int = 1,
    rounds: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    device: str = "cpu",
    unpruned: nn.Module | None = None,
) -> Sweep:
    """Accuracy, agreement with the unpruned model and interleaved latency of every configuration."""
    if latency_batch < 1 or batch < 1:
        raise UsageError(f"batch sizes must be positive, got --batch {batch}, --latency-batch {latency_batch}")
    unpruned = unpruned if unpruned is not None else base.load_unpruned()
    images = preprocess(data.images, unpruned).numpy()
    reps = -(-latency_batch // len(images))
    feed = {INPUT_NAME: np.ascontiguousarray(np.concatenate([images] * reps)[:latency_batch])}
    specs = [base.unpruned(), *configurations(base, keeps, layer_sets, metrics, norms)]
    with tempfile.TemporaryDirectory(prefix="colln-eval-") as scratch, contextlib.ExitStack() as stack:
        built = [_runner(s, unpruned, backend, Path(scratch), threads, device) for s in specs]
        active = {str(i): stack.enter_context(runner) for i, (runner, _) in enumerate(built)}
        preds = [rt.run(active[str(i)], images, batch).argmax(-1) for i in range(len(specs))]
        stats = interleaved_latency(active, feed, rounds=rounds, warmup=warmup)
    rows = []
    for i, (spec, (_, plan), pred) in enumerate(zip(specs, built, preds)):
        flops = plan.flops()
        rows.append(
            Row(
                metric=spec.metric if i else "none",
                norm=spec.norm,
                keep=float(spec.keep),
                layers=plan.layers if i else (),
                keep_counts=plan.keep_counts if i else (),
                flops_ratio=flops.pruned / flops.full,
                accuracy=float((pred == data.labels).mean()),
                agreement=float((pred == preds[0]).mean()),
                latency=stats[str(i)],
            )
        )
    return Sweep(
        model=base.model,
        weights=base.weights or default_weights(base.model),
        data=data.name,
        num_images=len(data.images),
        backend=backend,
        device=device,
        baseline=rows[0],
        rows=tuple(rows[1:]),
    )


def pick(
    result: Sweep,
    latency_budget_ms: float | None = None,
    target_speedup: float | None = None,
) -> Row:
    """The most accurate configuration whose median latency fits the budget (or whose speedup over
    the unpruned model reaches the target); ties go to the faster one."""
    if (latency_budget_ms is None) == (target_speedup is None):
        raise UsageError("give exactly one of --latency-budget MS or --target-speedup X")
    if latency_budget_ms is not None:
        fits = [r for r in result.rows if r.latency.p50_ms <= latency_budget_ms]
        wanted = f"a median latency within {latency_budget_ms:g} ms"
    else:
        fits = [r for r in result.rows if result.speedup(r) >= target_speedup]
        wanted = f"a speedup of {target_speedup:g}x"
    if not fits:
        fastest = min(result.rows, key=lambda r: r.latency.p50_ms)
        raise NoFitError(
            f"no configuration reaches {wanted}: the fastest is {fastest.key} at {fastest.latency.p50_ms:.3g} ms "
            f"({result.speedup(fastest):.2f}x); loosen the budget or sweep lower --keep / earlier --layers"
        )
    return max(fits, key=lambda r: (r.accuracy, -r.latency.p50_ms))


def export_command(
    row: Row,
    base: ExportSpec,
) -> str:
    """The ``colln-export`` call that builds ``row``'s configuration of the sweep over ``base``."""
    args = [
        "colln-export", base.model, "--keep", f"{row.keep:g}", "--layers", ",".join(map(str, row.layers)),
        "--metric", row.metric, "--norm", f"{row.norm:g}",
    ]  # fmt: skip
    args += ["--weights", base.weights] if base.weights else []
    args += ["--img-size", str(base.img_size)] if base.img_size else []
    args += ["--rescue", f"{base.rescue:g}"] if row.metric == "correct" and base.rescue != ExportSpec.rescue else []
    args += ["--fuse"] if base.fuse else []
    return shlex.join(args)


def series_label(
    metric: str,
    norm: float,
    norms: Sequence[float],
) -> str:
    """``Col-Ln (n=4)`` when several norm orders were swept, else just the metric."""
    label = METRIC_LABELS.get(metric, metric)
    return f"{label} (n={norm:g})" if metric != "cls" and len(set(norms)) > 1 else label


def table_cells(
    result: Sweep,
    layers: tuple[int, ...],
) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """The paper-shaped tables for one layer set: header, accuracy rows and latency rows (rows are
    metrics, columns keep rates; cells ``top-1 % (agreement %)`` and ``ms (speedup)``, then the
    FLOPs ratio)."""
    header = ["metric", *(f"keep {k:g}" for k in result.keeps)]
    norms = [n for _, n in result.series()]
    acc_rows, lat_rows = [], []
    for metric, norm in result.series():
        cells = [result.find(metric, norm, k, layers) for k in result.keeps]
        label = series_label(metric, norm, norms)
        acc_rows.append([label, *(f"{100 * r.accuracy:.1f} ({100 * r.agreement:.1f})" if r else "-" for r in cells)])
        lat_rows.append([label, *(f"{r.latency.p50_ms:.3g} ({result.speedup(r):.2f}x)" if r else "-" for r in cells)])
    # The FLOPs ratio depends on keep and layers only, not on the metric: one row under the timings.
    any_row = [next((r for r in result.rows if (r.keep, r.layers) == (k, layers)), None) for k in result.keeps]
    lat_rows.append(["FLOPs / unpruned", *(f"{r.flops_ratio:.2f}" if r else "-" for r in any_row)])
    return header, acc_rows, lat_rows


def _md_table(
    header: list[str],
    rows: list[list[str]],
) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def describe(
    result: Sweep,
) -> str:
    """One line naming what was measured."""
    base = result.baseline
    return (
        f"{result.model} ({result.weights} weights) on {result.num_images} {result.data} images, {result.backend} on {result.device}; "
        f"unpruned top-1 {100 * base.accuracy:.1f}%, {base.latency.p50_ms:.3g} ms median at batch {base.latency.batch}"
    )


def markdown(
    result: Sweep,
) -> str:
    """The results as markdown: per layer set, the accuracy table and the latency table."""
    parts = [f"# colln-eval: {result.model}", "", describe(result) + ".", ""]
    for layers in result.layer_sets:
        header, acc, lat = table_cells(result, layers)
        where = ", ".join(map(str, layers))
        parts += [f"## Pruning at blocks {where}", "", "Top-1 accuracy % (agreement with the unpruned model %):", ""]
        parts += [_md_table(header, acc), "", f"Median latency ms at batch {result.baseline.latency.batch} (speedup over unpruned):", ""]
        parts += [_md_table(header, lat), ""]
    if result.pick:
        parts += ["## Pick", "", f"{result.pick['why']}: `{result.pick['command']}`", ""]
    return "\n".join(parts)


def print_rich(
    result: Sweep,
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        # Piped output has no width to fit; rich would assume 80 columns and wrap every cell.
        console.width = max(console.width, 120)
    console.print(describe(result))
    for layers in result.layer_sets:
        header, acc, lat = table_cells(result, layers)
        where = ", ".join(map(str, layers))
        for title, rows in ((f"top-1 % (agreement %), pruning at blocks {where}", acc), (f"median ms (speedup), blocks {where}", lat)):
            table = Table(title=title)
            for i, h in enumerate(header):
                table.add_column(h, justify="left" if i == 0 else "right")
            for r in rows:
                table.add_row(*r)
            console.print(table)


def plot_accuracy_vs_keep(
    result: Sweep,
    path: Path,
) -> None:
    """One panel per layer set: accuracy against keep rate, one line per metric, unpruned dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = result.layer_sets
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.2), squeeze=False, sharey=True)
    norms = [n for _, n in result.series()]
    for ax, layers in zip(axes[0], sets):
        for metric, norm in result.series():
            pts = [(r.keep, 100 * r.accuracy) for r in result.rows if (r.metric, r.norm, r.layers) == (metric, norm, layers)]
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=series_label(metric, norm, norms))
        ax.axhline(100 * result.baseline.accuracy, color="grey", linestyle="--", label="unpruned")
        ax.set_title(f"pruning at blocks {', '.join(map(str, layers))}")
        ax.set_xlabel("keep rate per pruning block")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][0].legend(loc="lower right")
    fig.suptitle(f"{result.model} ({result.weights} weights), {result.num_images} {result.data} images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(
    points: Sequence[tuple[float, float]],
) -> list[tuple[float, float]]:
    """(latency, accuracy) points no other point beats on both: faster and at least as accurate."""
    front: list[tuple[float, float]] = []
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((lat, acc))
    return front


def plot_pareto(
    result: Sweep,
    path: Path,
) -> None:
    """Accuracy against measured median latency: every configuration, the unpruned point, and the
    Pareto front through them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    norms = [n for _, n in result.series()]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = dict(zip(result.layer_sets, "osD^v<>p"))
    annotate = len(result.layer_sets) == 1
    for (metric, norm), color in zip(result.series(), colors * 3):
        ax.scatter([], [], color=color, label=series_label(metric, norm, norms))
        for r in (r for r in result.rows if (r.metric, r.norm) == (metric, norm)):
            ax.scatter(r.latency.p50_ms, 100 * r.accuracy, color=color, marker=markers.get(r.layers, "o"))
            if annotate:
                ax.annotate(f"{r.keep:g}", (r.latency.p50_ms, 100 * r.accuracy), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(
    result: Sweep,
    directory: Path,
) -> None:
    """results.json, results.md and the two PNG plots into ``directory``."""
    directory = Path(directory)
    (directory / RESULTS_JSON).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (directory / RESULTS_MD).write_text(markdown(result))
    plot_accuracy_vs_keep(result, directory / KEEP_PLOT)
    plot_pareto(result, directory / PARETO_PLOT)
