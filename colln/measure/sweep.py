"""Accuracy / latency sweeps of keep schedules: what each (metric, keep, layers) costs in accuracy
and buys in speed, the paper-shaped table, the plots, and the budget picker.

Every configuration runs through the same runner protocol (PyTorch or an ONNX Runtime export), so
accuracy and latency come from the very models a user would ship. Latency is measured with all
configurations interleaved (:func:`colln.infer.timing.measure`), the unpruned model among them,
so speedups are ratios taken under the same machine load. Rendering (tables, plots) is the
application layer's (:mod:`colln.report.render`, :mod:`colln.report.plots`).
"""

from __future__ import annotations

import contextlib
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from torch import nn

from colln.data import Labelled, preprocess, top1_correct
from colln.errors import NoFitError, UsageError
from colln.export.artifact import check_merge_precision, export_into
from colln.export.precisions import GRAPH_PRECISIONS
from colln.export.spec import ExportSpec
from colln.infer.runners import BACKENDS, open_runner, run
from colln.infer.timing import Comparison, LatencyStats, Timing, measure
from colln.models.config import PruneConfig, config_flags, config_name
from colln.models.plan import KeepPlan, default_layers
from colln.models.registry import default_weights
from colln.models.rewrite import get_plan
from colln.train.distributed import all_sum, env_ranks, process_group

SCHEDULES = ("evit", "early")
# Sweeps build one model per configuration: a TensorRT engine each would take minutes.
EVAL_BACKENDS = tuple(b for b in BACKENDS if b != "tensorrt")
# The paper's early-pruning setting for a 12-block ViT; scaled to other depths like default_layers.
EARLY_BLOCKS_OF_12 = (0, 3, 6)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
KEEP_PLOT = "accuracy_vs_keep.png"
PARETO_PLOT = "accuracy_vs_latency.png"
# int8 rows are calibrated on this many of the evaluated images (spread evenly over the set).
CALIBRATION_IMAGES = 256
METRIC_LABELS = {"colln": "Col-Ln", "cls": "[CLS]", "correct": "[CLS]+Col-Ln rescue", "none": "unpruned", "tome": "ToMe"}
# prune: the metric's top-k; merge: the same top-k, the dropped tokens merged into the kept ones; tome: ToMe.
METHODS = ("prune", "merge", "tome")
# Under torchrun: how long a rank waits in a collective for the others (the ranks meet once, after
# each has built every configuration, then leave together) before it fails instead of hanging.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


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


def resolve_layers(
    choices: Sequence[tuple[int, ...] | str],
    depth: int,
) -> list[tuple[int, ...]]:
    """Layer sets and schedule names -> distinct layer sets, in order."""
    sets = [schedule_layers(c, depth) if isinstance(c, str) else tuple(c) for c in choices]
    return list(dict.fromkeys(sets))


@dataclass(frozen=True)
class Row:
    """One measured configuration. ``metric`` is ``none`` for the unpruned model. ``method``: see
    :data:`METHODS`; ToMe rows have ``r`` (merged per block) and keep 1.0 at every block."""

    metric: str
    norm: float
    keep: float
    layers: tuple[int, ...]
    keep_counts: tuple[int, ...]
    flops_ratio: float
    accuracy: float
    agreement: float
    latency: LatencyStats
    # Over the unpruned baseline timed in the same run: the median of the per-round ratios and its
    # interquartile range (the statistic colln-bench and colln-export report); 1.0 for the baseline.
    speedup: float = 1.0
    speedup_iqr: tuple[float, float] = (1.0, 1.0)
    precision: str = "fp32"
    method: str = "prune"
    r: int | None = None

    @property
    def series_name(self) -> str:
        """What a table row / plot line groups by: the metric, ``<metric>+merge``, or ``tome``."""
        return {"prune": self.metric, "merge": f"{self.metric}+merge", "tome": "tome"}[self.method]

    @property
    def key(self) -> str:
        """The row's name in results.json (:func:`colln.models.config.config_name` in detail)."""
        return config_name(self.config(), self.precision, detail=True)

    def config(
        self,
        base: PruneConfig | None = None,
    ) -> PruneConfig:
        """The configuration the sweep built this row from over ``base`` (the sweep's base settings,
        see :func:`configurations`; None: the defaults). Not for the unpruned baseline row."""
        base = base if base is not None else PruneConfig()
        if self.method == "tome":
            return replace(base, keep=1.0, layers=None, tome=self.r)
        return replace(base, keep=self.keep, layers=self.layers, metric=self.metric, norm=self.norm, merge=self.method == "merge")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"], out["keep_counts"] = list(self.layers), list(self.keep_counts)
        out["latency"] = self.latency.to_dict()
        out["speedup_iqr"] = list(self.speedup_iqr)
        return out

    @classmethod
    def from_dict(
        cls,
        data: dict,
    ) -> Row:
        return cls(
            **{k: v for k, v in data.items() if k not in ("layers", "keep_counts", "latency", "speedup_iqr")},
            speedup_iqr=tuple(data.get("speedup_iqr", (1.0, 1.0))),
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
    # How the rows were timed (None: a results.json written before it was recorded).
    timing: Timing | None = None

    def speedup(
        self,
        row: Row,
    ) -> float:
        """Over the unpruned baseline: the median of the per-round latency ratios of the same run."""
        return row.speedup

    @property
    def keep_rows(self) -> tuple[Row, ...]:
        """The rows with a keep schedule (pruned or merged): ToMe rows have r instead."""
        return tuple(r for r in self.rows if r.method != "tome")

    @property
    def tome_rows(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if r.method == "tome")

    @property
    def keeps(self) -> list[float]:
        return sorted({r.keep for r in self.keep_rows})

    @property
    def layer_sets(self) -> list[tuple[int, ...]]:
        return list(dict.fromkeys(r.layers for r in self.keep_rows))

    def series(self) -> list[tuple[str, float, str]]:
        """(series name, norm, precision) of the keep-schedule rows in sweep order: one table row /
        plot line each (the name is :attr:`Row.series_name`)."""
        return list(dict.fromkeys((r.series_name, r.norm, r.precision) for r in self.keep_rows))

    def find(
        self,
        metric: str,
        norm: float,
        keep: float,
        layers: tuple[int, ...],
        precision: str = "fp32",
    ) -> Row | None:
        wanted = (metric, norm, keep, layers, precision)
        return next((r for r in self.keep_rows if (r.series_name, r.norm, r.keep, r.layers, r.precision) == wanted), None)

    def to_dict(self) -> dict:
        rows = [r.to_dict() for r in self.rows]
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
            "timing": self.timing.to_dict() if self.timing is not None else None,
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
            timing=Timing(**data["timing"]) if data.get("timing") else None,
        )


def configurations(
    base: ExportSpec,
    keeps: Sequence[float],
    layer_sets: Sequence[tuple[int, ...]],
    metrics: Sequence[str],
    norms: Sequence[float],
    methods: Sequence[str] = ("prune",),
    tome_rs: Sequence[int] = (),
) -> list[ExportSpec]:
    """One spec per (method, layers, metric, norm, keep) for ``prune`` and ``merge``, one per r for
    ``tome`` (at every block). [CLS] attention has no norm order: it gets one row (at the first
    norm) instead of identical copies."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown method {','.join(unknown) or '(none)'}: choose from {','.join(METHODS)}")
    specs = []
    for method in (m for m in methods if m != "tome"):
        for layers in layer_sets:
            for metric in metrics:
                for norm in norms[:1] if metric == "cls" else norms:
                    specs.extend(
                        replace(
                            base,
                            pruning=replace(
                                base.pruning,
                                keep=float(k),
                                layers=tuple(layers),
                                metric=metric,
                                norm=float(norm),
                                merge=method == "merge",
                            ),
                        )
                        for k in keeps
                    )
    if "tome" in methods:
        if not tome_rs:
            raise UsageError("--method tome needs the r values to sweep: give --tome, e.g. 4,8,12")
        specs.extend(replace(base, pruning=replace(base.pruning, keep=1.0, layers=None, tome=int(r))) for r in tome_rs)
    return specs


@dataclass(frozen=True)
class SweepOptions:
    """What a sweep varies (method x keep x layers x metric x norm x precision, and ToMe's r) and how
    it runs and times it. ``layers`` holds layer sets and schedule names (``evit``, ``early``),
    resolved per model; ``methods`` (:data:`METHODS`): ``tome`` adds one row per r in ``tome_rs``.
    ``timing``: every configuration and the unpruned model interleaved at ``latency_batch``
    (:class:`colln.infer.timing.Timing`: colln-export's and colln-bench's defaults too); its
    threads also run the accuracy pass."""

    keeps: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    layers: tuple[tuple[int, ...] | str, ...] = ("evit",)
    metrics: tuple[str, ...] = ("colln", "cls", "correct")
    norms: tuple[float, ...] = (4.0,)
    methods: tuple[str, ...] = ("prune",)
    tome_rs: tuple[int, ...] = (4, 8, 12, 16)
    precisions: tuple[str, ...] = ("fp32",)
    backend: str = "torch"
    batch: int = 64
    latency_batch: int = 1
    timing: Timing = field(default_factory=Timing)
    device: str = "cpu"


def sweep(
    base: ExportSpec,
    data: Labelled,
    options: SweepOptions,
    unpruned: nn.Module | None = None,
) -> Sweep | None:
    """Accuracy, agreement with the unpruned model and interleaved latency of every configuration,
    at every precision in ``options.precisions`` (the unpruned baseline is fp32; int8 graphs run on
    ONNX Runtime and are calibrated on up to :data:`CALIBRATION_IMAGES` of the evaluated images).

    Under ``torchrun`` every process scores its share of the images (every world-size-th one; a
    share may be empty), the counts are summed over the processes, and rank 0 alone times the
    configurations and returns the sweep (the others return None)."""
    o = options
    _check_sweep_options(o)
    unpruned = unpruned if unpruned is not None else base.load_unpruned()
    layer_sets = resolve_layers(o.layers, len(unpruned.blocks))
    images = preprocess(data.images, unpruned).numpy()
    calibration = images[np.linspace(0, len(images) - 1, min(len(images), CALIBRATION_IMAGES)).round().astype(int)]
    specs = _sweep_specs(base, o, layer_sets)
    timing = _sweep_timing(o)
    with tempfile.TemporaryDirectory(prefix="colln-eval-") as scratch, contextlib.ExitStack() as stack:
        plans, active = [], {}
        for i, spec in enumerate(specs):
            plan, source = _build_configuration(spec, Path(scratch) / str(i), unpruned, calibration, o.backend)
            plans.append(plan)
            active[str(i)] = stack.enter_context(
                open_runner(source, o.backend, o.device, timing.threads, split_batches=timing.split_batches)
            )
        counts, is_main = _score(active, images, data.labels, o.device, o.batch)
        if not is_main:
            return None
        timed = measure(active, images.shape[1:], [o.latency_batch], timing, baseline="0", sample=images)[o.latency_batch]
    rows = _rows(specs, plans, counts, timed, len(images))
    return Sweep(
        model=base.model,
        weights=base.weights or default_weights(base.model),
        data=data.name,
        num_images=len(data.images),
        backend=o.backend,
        device=o.device,
        baseline=rows[0],
        rows=tuple(rows[1:]),
        timing=timing,
    )


def _check_sweep_options(
    o: SweepOptions,
) -> None:
    """A UsageError for batch sizes, a backend or precisions a sweep cannot run."""
    backend, precisions = o.backend, o.precisions
    if o.latency_batch < 1 or o.batch < 1:
        raise UsageError(f"batch sizes must be positive, got --batch {o.batch}, --latency-batch {o.latency_batch}")
    if backend not in EVAL_BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: colln-eval runs {' or '.join(EVAL_BACKENDS)}")
    unknown = [p for p in precisions if p not in GRAPH_PRECISIONS]
    if unknown or not precisions:
        raise UsageError(f"unknown precision {','.join(unknown) or '(none)'}: choose from {', '.join(GRAPH_PRECISIONS)}")
    if backend == "torch" and set(precisions) != {"fp32"}:
        raise UsageError(f"--precision {','.join(precisions)} needs --backend onnxruntime (PyTorch runs the fp32 model)")
    if backend == "openvino" and not set(precisions) <= {"fp32", "int8"}:
        raise UsageError(f"--backend openvino runs --precision fp32 or int8, not {','.join(precisions)}")


def _sweep_specs(
    base: ExportSpec,
    o: SweepOptions,
    layer_sets: list[tuple[int, ...]],
) -> list[ExportSpec]:
    """The unpruned baseline, then every configuration at every precision; merged configurations
    are checked against their precision before any is built (the OpenVINO path exports fp32 graphs)."""
    configs = configurations(base, o.keeps, layer_sets, o.metrics, o.norms, o.methods, o.tome_rs)
    specs = [base.unpruned(), *(replace(c, precision=p) for p in o.precisions for c in configs)]
    for spec in specs:
        check_merge_precision(spec)
    return specs


def _sweep_timing(
    o: SweepOptions,
) -> Timing:
    """``o.timing``; on PyTorch under torchrun without threads given, the threads PyTorch runs with."""
    if o.backend == "torch" and o.timing.threads is None and env_ranks().world_size > 1:
        # torchrun gives its workers OMP_NUM_THREADS (1 unless set): what PyTorch runs with, recorded.
        return replace(o.timing, threads=torch.get_num_threads())
    return o.timing


def _build_configuration(
    spec: ExportSpec,
    directory: Path,
    unpruned: nn.Module,
    calibration: np.ndarray,
    backend: str,
) -> tuple[KeepPlan, Path | nn.Module]:
    """Build ``spec`` for ``backend``: its plan and what its runner opens (PyTorch: the pruned
    model; else ``directory``, created, with the graph written into it)."""
    if backend == "torch":
        source = spec.apply(unpruned)
        return get_plan(source), source
    directory.mkdir()
    if backend == "openvino":
        from colln.export.openvino import write_ir

        # OpenVINO's int8 is NNCF on the fp32 graph, calibrated on the same images.
        plan = export_into(replace(spec, precision="fp32"), directory, unpruned=unpruned).plan
        write_ir(directory, spec.precision, calibration)
        return plan, directory
    return export_into(spec, directory, unpruned=unpruned, calibration=calibration).plan, directory


def _score(
    active: dict[str, BaseRunner],
    images: np.ndarray,
    labels: np.ndarray,
    device: str,
    batch: int,
) -> tuple[list[float], bool]:
    """Every runner's correct top-1 count and its count agreeing with the unpruned one (runner
    ``"0"``), each list in runner order and summed over the ranks; and whether this is the main rank."""
    # The group lives for the one sum: the other ranks leave at once, not after rank 0's timing.
    with process_group(torch.device(device), timeout=COLLECTIVE_TIMEOUT) as ranks:
        share = slice(ranks.rank, None, ranks.world_size)
        shard, labels = images[share], labels[share]
        # More ranks than images leaves some a share of none: they add zero counts.
        nothing = np.zeros((0, 1), dtype=np.float32)
        scores = [run(active[str(i)], shard, batch) if len(shard) else nothing for i in range(len(active))]
        reference = scores[0].argmax(-1)
        counts = all_sum(
            [float(top1_correct(s, labels)) for s in scores] + [float(top1_correct(s, reference)) for s in scores], ranks
        )
    return counts, ranks.is_main


def _rows(
    specs: list[ExportSpec],
    plans: list[KeepPlan],
    counts: list[float],
    timed: Comparison,
    num_images: int,
) -> list[Row]:
    """The sweep's rows, the unpruned baseline (the first spec) first, from the summed ``counts``
    (:func:`_score`) and the interleaved timing."""
    correct, agreeing = counts[: len(specs)], counts[len(specs) :]
    rows = []
    for i, (spec, plan) in enumerate(zip(specs, plans)):
        flops = plan.flops()
        rows.append(
            Row(
                metric=spec.pruning.metric if i else "none",
                norm=spec.pruning.norm,
                keep=float(spec.pruning.keep),
                layers=plan.layers if i else (),
                keep_counts=plan.keep_counts if i else (),
                flops_ratio=flops.pruned / flops.full,
                accuracy=correct[i] / num_images,
                agreement=agreeing[i] / num_images,
                latency=timed.stats[str(i)],
                speedup=timed.speedups[str(i)][0] if i else 1.0,
                speedup_iqr=timed.speedups[str(i)][1:] if i else (1.0, 1.0),
                precision=spec.precision,
                method=plan.method if i else "prune",
                r=spec.pruning.tome if i else None,
            )
        )
    return rows


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
    *,
    backend: str | None = None,
) -> str:
    """The ``colln-export`` call that builds ``row``'s configuration of the sweep over ``base``, as
    ``backend`` ran it (``openvino``: with the IR, at the row's precision; None: ``torch``)."""
    args = ["colln-export", base.model, *config_flags(row.config(base.pruning))]
    args += ["--weights", base.weights] if base.weights else []
    args += ["--img-size", str(base.img_size)] if base.img_size else []
    args += ["--precision", row.precision] if row.precision != "fp32" else []
    # The IR's precision is the export's by default: fp32 or (NNCF) int8, as the sweep ran it.
    args += ["--openvino"] if backend == "openvino" else []
    return shlex.join(args)


def pareto_front(
    points: Sequence[tuple[float, float]],
) -> list[tuple[float, float]]:
    """(latency, accuracy) points no other point beats on both: faster and at least as accurate."""
    front: list[tuple[float, float]] = []
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((lat, acc))
    return front
