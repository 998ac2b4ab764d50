"""``colln-bench``'s measurement: an export against its unpruned counterpart, interleaved, per batch
size, with the keep plan's FLOPs bound; and the regression check of its ratios against a regression
file (the ratios recorded earlier: colln-bench ``--save-baseline`` / ``--baseline``)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from torch import nn

from colln.data import ValImages
from colln.errors import ExportDirError, MeasurementError, RegressionFileError, UsageError, ValidationFailedError
from colln.export.artifact import ORT_SESSION_OPTIONS, default_out_dir, read_export
from colln.export.manifest import deployed
from colln.export.precisions import VOCABULARY, stack_precisions
from colln.export.spec import INPUT_NAME, ONNX_FILE, PLAN_KEY, ExportSpec
from colln.export.unpruned import cached_export, default_cache, unpruned_engine, unpruned_export
from colln.infer.environment import available_memory, environment
from colln.infer.runners import OpenvinoRunner, open_runner, run
from colln.infer.timing import (
    PLAUSIBLE_SPEEDUP,
    Comparison,
    LatencyStats,
    Timing,
    measure,
    paired_speedup,
    plausible_speedup,
)
from colln.models.plan import KeepPlan

RATIO_METRICS = ("speedup", "efficiency")


def bench_export(
    export_dir: Path,
    backend: str = "onnxruntime",
    batches: Sequence[int] = (1, 8, 32),
    timing: Timing | None = None,
    cache: Path | None = None,
    device: str = "cpu",
    runtimes: Sequence[str] = (),
) -> dict:
    """Benchmark an export against its unpruned counterpart, interleaved, per batch size, as
    ``timing`` says (``None``: :class:`colln.infer.timing.Timing`'s defaults, colln-export's and
    colln-eval's too).

    Returns the JSON-ready report: per batch the latency stats of both, ``speedup`` (median of the
    paired per-round ratios, with its interquartile range), the keep plan's FLOPs ``bound`` and
    ``efficiency = speedup / bound``; plus the spec, plan, ``timing`` and environment.
    ``runtimes`` (e.g. ``("onnxruntime", "openvino")``): time the export's variant stack on those
    runtimes in the same run (:func:`stack_exports`; the report's ``stack``)."""
    timing = timing if timing is not None else Timing()
    runtimes = tuple(runtimes)
    if runtimes:
        check_runtimes(runtimes)
    if runtimes and backend != "onnxruntime":
        raise UsageError(f"--runtimes compares CPU runtimes against ONNX Runtime: leave --backend at onnxruntime, not {backend}")
    export_dir = Path(export_dir)
    spec = read_export(export_dir)
    plan = spec.keep_plan()
    check_batches_fit(batches, plan)
    flops = plan.flops()
    cache = cache if cache is not None else default_cache(export_dir)
    base_dir = unpruned_export(spec, cache)
    if backend == "tensorrt":
        unpruned_engine(export_dir, base_dir)
    if backend == "openvino":
        _cached_ir(base_dir, unpruned_export(replace(spec, precision="fp32", plan_record={}), cache), None, None)
    load_before = os.getloadavg()
    stack = stack_runtimes(spec.precision, backend, runtimes)
    if stack is not None:
        exports = stack_exports(spec, export_dir, cache, runtimes=stack)
    elif backend == "openvino":
        # Both at the export's own precision hint (bf16, int8-bf16), not the one the cached IR records.
        precision = deployed(export_dir, "openvino", spec).precision
        exports = {"unpruned": Variant(base_dir, backend, precision), "pruned": Variant(export_dir, backend, precision)}
    else:
        exports = {"unpruned": Variant(base_dir, backend), "pruned": Variant(export_dir, backend)}
    paired = runtimes[0] if runtimes and "onnxruntime" not in runtimes else "onnxruntime"
    timed = time_variants(exports, batches, timing, flops.bound, spec.precision, device, paired)
    check_plausible(timed, flops.bound)
    results = {b: {**row, "bound": flops.bound, "efficiency": row["speedup"] / flops.bound} for b, row in timed.rows.items()}
    return {
        "case": case_name(spec, runtime_label(backend, runtimes), timing.threads, device),
        "export": str(export_dir),
        "unpruned_export": str(base_dir),
        "spec": {k: v for k, v in spec.to_dict().items() if k != PLAN_KEY},
        "plan": str(plan),
        "flops": flops.to_dict(),
        "backend": backend,
        "runtimes": list(runtimes) or [backend],
        "device": device,
        "timing": timing.to_dict(),
        # The timing's fields as reports before "timing" had them (threads 0: the runtime's default).
        "threads": timing.threads or 0,
        "split_batches": timing.split_batches,
        "rounds": timing.rounds,
        "warmup": timing.warmup,
        "batches": results,
        "stack": timed.stack,
        "environment": environment(backend, timing.threads, load_before),
    }


def stack_runtimes(
    precision: str,
    backend: str = "onnxruntime",
    runtimes: Sequence[str] = (),
) -> tuple[str, ...] | None:
    """The one decision of how an export is timed (colln-export and colln-bench): the runtimes of
    its variant stack (:func:`stack_exports`), or None for a pair (pruned against unpruned on
    ``backend``). An export timed across ``runtimes`` is a stack of them; an int8 export on ONNX
    Runtime is timed in its stack too (fp32 and int8, pruned and unpruned, one run): an int8
    speedup alone would not say what int8 gives over fp32."""
    if runtimes:
        return tuple(runtimes)
    return ("onnxruntime",) if precision == "int8" and backend == "onnxruntime" else None


def runtime_label(
    backend: str,
    runtimes: Sequence[str] = (),
) -> str:
    """What a case name says was timed: ``onnxruntime+openvino`` for a stack across runtimes, else the backend."""
    return "+".join(runtimes) if runtimes else backend


def image_bytes(
    plan: KeepPlan,
) -> int:
    """What one image of a batch takes at least while the unpruned graph runs, in fp32: its pixels,
    and inside one block the residual stream and its norm, the MLP's hidden activations and one
    head's attention matrix (a lower bound: runtimes keep more alive)."""
    d, n = plan.dims, plan.num_tokens
    pixels = d.patch_macs // d.attn_dim  # the patch embedding's MACs are D per input value
    hidden = d.mlp_macs // (2 * d.attn_dim)  # fc1 and fc2: D x hidden each
    return 4 * (pixels + n * (2 * d.attn_dim + hidden) + n * n)


def check_batches_fit(
    batches: Sequence[int],
    plan: KeepPlan,
) -> None:
    """UsageError before anything is allocated when the largest batch cannot fit in the memory this
    process has left (:func:`colln.infer.environment.available_memory`), by :func:`image_bytes`."""
    free, per_image = available_memory(), image_bytes(plan)
    if free is None or max(batches) * per_image <= free:
        return
    gib = 2**30
    raise UsageError(
        f"batch {max(batches)} needs at least {max(batches) * per_image / gib:.1f} GiB for its activations, and this "
        f"process can allocate {free / gib:.1f} GiB: give --batch sizes of at most {free // per_image}, or free memory "
        "(or raise the limit: ulimit -v, the container's memory)",
        stage="memory",
    )


@dataclass(frozen=True)
class Variant:
    """One entry of a variant stack: an export directory run on ``backend`` at ``precision``
    (``None``: the export's own; OpenVINO runs an fp32 IR at ``bf16`` too, an int8 IR at ``int8-bf16``)."""

    directory: Path
    backend: str = "onnxruntime"
    precision: str | None = None

    def open(
        self,
        device: str = "cpu",
        threads: int | None = None,
        split_batches: bool = True,
    ) -> BaseRunner:
        return open_runner(self.directory, self.backend, device, threads, split_batches=split_batches, precision=self.precision)

    def describe(
        self,
        shown: Path | None = None,
        runtime_precisions: Mapping[str, int] | None = None,
    ) -> dict:
        """The artifact and the options behind a figure (the report names them); for OpenVINO also
        how many matrix products its compiled model runs at each precision (``runtime_precisions``:
        what its timed runner reported, :class:`Measured`; None: compiled again to read them).
        ``shown``: the directory the report names for this variant's (None: its own; the final
        directory of an export still being written in a temp dir, which is renamed into place after)."""
        artifact = deployed(self.directory, self.backend, precision=self.precision)
        options = dict(artifact.options)
        if self.backend == "onnxruntime":
            # What colln's ONNX Runtime runner does on top of a plain session (colln.infer.runners).
            options = {**ORT_SESSION_OPTIONS, "batch slices": "one per thread on 2+ threads, unless --no-split-batches"}
            if artifact.runtime == "onnx":
                options["fusion at load"] = "colln.export.ort_graph.for_onnxruntime"
        where = Path(shown) if shown is not None else self.directory
        described = {"runtime": self.backend, "artifact": str(where / artifact.file), "options": options}
        if self.backend == "openvino" and runtime_precisions is not None:
            described["runtime_precisions"] = dict(runtime_precisions)
        elif self.backend == "openvino":
            # Compiled again as it was timed (the same hint): what its execution graph ran.
            with self.open() as runner:
                described["runtime_precisions"] = runner.runtime_precisions
        return described


@dataclass(frozen=True)
class Measured:
    """One interleaved run (:func:`measure_exports`): per batch size the :class:`Comparison`, and
    what each OpenVINO runner's compiled model ran (``{name: {precision: matrix products}}``), read
    from the runners that were timed instead of compiling them again."""

    comparisons: dict[int, Comparison]
    runtime_precisions: dict[str, dict[str, int]]


def measure_exports(
    exports: Mapping[str, Path | Variant],
    batches: Sequence[int],
    timing: Timing | None = None,
    device: str = "cpu",
) -> Measured:
    """One interleaved run of ``exports`` (name -> export directory on ONNX Runtime, or a
    :class:`Variant`; the first is the baseline): ``{"unpruned", "pruned"}``, or a variant stack
    (:func:`stack_exports`), opened with ``timing``'s threads and batch splitting."""
    timing = timing if timing is not None else Timing()
    with contextlib.ExitStack() as active:
        runners = {
            name: active.enter_context(
                (v if isinstance(v, Variant) else Variant(Path(v))).open(device, timing.threads, timing.split_batches)
            )
            for name, v in exports.items()
        }
        chw = next(iter(runners.values())).get_input_metadata(use_numpy_dtypes=False)[INPUT_NAME].shape[1:]
        compared = measure(runners, chw, batches, timing, baseline=next(iter(runners)))
        ran = {name: dict(r.runtime_precisions) for name, r in runners.items() if isinstance(r, OpenvinoRunner)}
        return Measured(compared, ran)


@dataclass(frozen=True)
class Timed:
    """One interleaved run of an export's variants, as colln-export and colln-bench report it:
    ``rows`` (per batch size, pruned against unpruned: :func:`latency_rows`) and ``stack`` (every
    variant of a stack: :func:`stack_latency`; ``None`` for a pair)."""

    rows: dict[str, dict]
    stack: dict | None


def time_variants(
    exports: Mapping[str, Path | Variant],
    batches: Sequence[int],
    timing: Timing | None,
    bound: float,
    precision: str = "fp32",
    device: str = "cpu",
    runtime: str = "onnxruntime",
    renamed: Mapping[Path, Path] | None = None,
) -> Timed:
    """Time ``exports`` (``{"unpruned", "pruned"}`` or a variant stack) in one interleaved run
    (:func:`measure_exports`) and pair them; ``bound``: the keep plan's FLOPs bound; ``runtime``:
    whose pruned and unpruned variants of a stack make the rows (:func:`latency_rows`);
    ``renamed``: ``{temp dir: final dir}`` of exports still being written, which the stack's
    artifacts name by their final directory."""
    measured = measure_exports(exports, batches, timing, device)
    compared = measured.comparisons
    stack = None if "pruned" in exports else stack_latency(compared, bound, exports, renamed, measured.runtime_precisions)
    return Timed(rows=latency_rows(compared, precision, runtime), stack=stack)


def check_plausible(
    timed: Timed,
    bound: float,
) -> None:
    """MeasurementError naming the first speedup of ``timed`` outside :data:`PLAUSIBLE_SPEEDUP` for
    the FLOPs ``bound``: such a figure is a failed measurement, not a result."""
    speedups = [(b, "pruned", row["speedup"]) for b, row in timed.rows.items()]
    for b, rows in (timed.stack or {}).get("batches", {}).items():
        speedups += [(b, name, row["speedup"]) for name, row in rows.items()]
    for b, name, speedup in speedups:
        if not plausible_speedup(speedup, bound):
            lowest, multiple = PLAUSIBLE_SPEEDUP
            load, cpus = os.getloadavg()[0], len(os.sched_getaffinity(0))
            raise MeasurementError(
                f"batch {b}: {name} measured a speedup of {speedup:.3f}, outside what a keep plan with a FLOPs bound of "
                f"{bound:.2f} can give ({lowest:g} to {multiple * bound:.3g}): the timing failed (load average "
                f"{load:.1f} on {cpus} CPUs); run it again on a quieter machine, with fewer --threads or more --rounds"
            )


def latency_rows(
    compared: Mapping[int, Comparison],
    precision: str = "int8",
    runtime: str = "onnxruntime",
) -> dict[str, dict]:
    """Per batch size, pruned against unpruned (for a stack: ``runtime``'s pruned against
    unpruned at the export's ``precision``)."""
    return {str(b): c.pair() if "pruned" in c.times else stack_pair(c, precision, runtime) for b, c in compared.items()}


# The int8 stack on ONNX Runtime, in table order; speedups are over the first. Other runtimes'
# variants are named "<runtime>:<variant>" (see stack_exports).
STACK = ("unpruned-fp32", "pruned-fp32", "unpruned-int8", "pruned-int8")
RUNTIMES = ("onnxruntime", "openvino")


def variant_name(
    runtime: str,
    kind: str,
    precision: str,
) -> str:
    """``pruned-int8`` on ONNX Runtime (the baseline runtime), ``openvino:pruned-int8`` elsewhere."""
    name = f"{kind}-{precision}"
    return name if runtime == "onnxruntime" else f"{runtime}:{name}"


def stack_exports(
    spec: ExportSpec,
    export_dir: Path,
    cache: Path,
    unpruned: nn.Module | None = None,
    calibration: np.ndarray | None = None,
    runtimes: Sequence[str] = ("onnxruntime",),
) -> dict[str, Variant]:
    """The variant stack of an export: unpruned and pruned, at fp32 and the export's precision, on
    every runtime of ``runtimes`` (OpenVINO adds bf16 and int8-bf16:
    :func:`colln.export.precisions.stack_precisions`),
    ONNX Runtime's unpruned fp32 first (the baseline). The unpruned baselines and the pruned fp32
    counterpart come from (or go into) the baseline ``cache``; so do their OpenVINO IRs, while the
    export's own IR must be there (``colln-export --openvino``). The unpruned int8 graphs are
    calibrated on ``calibration`` (``None``: the default images), which should be what the pruned
    export was calibrated on. With ONNX Runtime only, an int8 export gives :data:`STACK`."""
    check_runtimes(runtimes)
    order = ("onnxruntime", *(r for r in runtimes if r != "onnxruntime"))
    precisions = {runtime: stack_precisions(runtime, spec.precision) for runtime in order}
    fp32 = replace(spec, precision="fp32", plan_record={})
    dirs = {
        ("unpruned", "fp32"): unpruned_export(fp32, cache, unpruned),
        ("pruned", "fp32"): Path(export_dir) if spec.precision == "fp32" else cached_export(fp32, cache, unpruned),
    }
    if spec.precision != "fp32":
        dirs["unpruned", spec.precision] = unpruned_export(spec, cache, unpruned, calibration)
        dirs["pruned", spec.precision] = Path(export_dir)
    variants: dict[str, Variant] = {}
    for runtime in order:
        for precision in precisions[runtime]:
            for kind in ("unpruned", "pruned"):
                directory = dirs[kind, VOCABULARY[precision].graph]
                if runtime == "openvino" and directory != Path(export_dir):
                    _cached_ir(directory, dirs[kind, "fp32"], unpruned, calibration)
                variants[variant_name(runtime, kind, precision)] = Variant(directory, runtime, precision)
    if "onnxruntime" not in runtimes:
        # ONNX Runtime's unpruned fp32 stays, as the common baseline.
        variants = {n: v for n, v in variants.items() if v.backend != "onnxruntime" or n == "unpruned-fp32"}
    return variants


def check_runtimes(
    runtimes: Sequence[str],
) -> None:
    """UsageError unless ``runtimes`` names known runtimes (:data:`RUNTIMES`), each once."""
    unknown = [repr(r) for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise UsageError(f"unknown runtime {', '.join(unknown) or '(none)'}: choose from {', '.join(RUNTIMES)}")
    twice = sorted({r for r in runtimes if runtimes.count(r) > 1})
    if twice:
        raise UsageError(
            f"runtimes are listed once each, {', '.join(twice)} is listed twice: give {','.join(dict.fromkeys(runtimes))}"
        )


def _cached_ir(
    directory: Path,
    fp32_dir: Path,
    unpruned: nn.Module | None,
    calibration: np.ndarray | None,
) -> None:
    """Give a cached export an OpenVINO IR at its precision (int8: NNCF on the fp32 counterpart's
    graph, calibrated like the ONNX Runtime int8 graph beside it), unless it has a matching one."""
    from colln.data import validation_images
    from colln.export.openvino import write_ir

    spec = read_export(directory)
    with contextlib.suppress(ExportDirError):
        deployed(directory, "openvino", spec)  # an IR that does not run this export's graph is refused
        return
    images = calibration
    if spec.precision == "int8" and images is None:
        images = validation_images(spec.model, unpruned if unpruned is not None else spec.load_unpruned()).images
    write_ir(directory, spec.precision, images, source=fp32_dir / ONNX_FILE)


def stack_pair(
    comparison: Comparison,
    precision: str = "int8",
    runtime: str = "onnxruntime",
) -> dict:
    """The classic ``{unpruned, pruned, speedup, speedup_iqr}`` row of a stacked export: pruned
    against unpruned on ``runtime`` at the export's ``precision``, paired from the stack's run."""
    unpruned, pruned = (variant_name(runtime, kind, precision) for kind in ("unpruned", "pruned"))
    speedup, q25, q75 = paired_speedup(comparison.times[unpruned], comparison.times[pruned])
    return {
        "unpruned": comparison.stats[unpruned].to_dict(),
        "pruned": comparison.stats[pruned].to_dict(),
        "speedup": speedup,
        "speedup_iqr": [q25, q75],
    }


def stack_latency(
    compared: Mapping[int, Comparison],
    bound: float,
    variants: Mapping[str, Variant] | None = None,
    renamed: Mapping[Path, Path] | None = None,
    runtime_precisions: Mapping[str, Mapping[str, int]] | None = None,
) -> dict:
    """``{"baseline", "variants", "flops_bound", "batches": {"<b>": {variant: LatencyStats + speedup,
    speedup_iqr, speedup_same_runtime, speedup_same_runtime_iqr}}, "artifacts": {variant: {runtime, artifact, options}}}``
    (OpenVINO's also ``runtime_precisions``: :meth:`Variant.describe`):
    every variant's paired speedup over ONNX Runtime's unpruned fp32 from the same run, and over
    the same runtime's unpruned variant at the same precision. ``renamed``: see :func:`time_variants`;
    ``runtime_precisions``: the timed OpenVINO runners' (:class:`Measured`)."""
    batches = {}
    names: list[str] = []
    for b, c in compared.items():
        names = list(c.times)
        base = c.times[names[0]]
        rows = {}
        for name in names:
            speedup, q25, q75 = paired_speedup(base, c.times[name])
            own = name.replace("pruned-", "unpruned-", 1) if "unpruned-" not in name else name
            same = paired_speedup(c.times[own], c.times[name]) if own in c.times else None
            rows[name] = {
                **LatencyStats.to_dict(c.stats[name]),
                "speedup": speedup,
                "speedup_iqr": [q25, q75],
                "speedup_same_runtime": None if same is None else same[0],
                "speedup_same_runtime_iqr": None if same is None else list(same[1:]),
            }
        batches[str(b)] = rows
    renamed = renamed or {}
    ran = runtime_precisions or {}
    artifacts = {n: v.describe(renamed.get(v.directory), ran.get(n)) for n, v in variants.items()} if variants else None
    return {"baseline": names[0], "variants": names, "flops_bound": bound, "batches": batches, "artifacts": artifacts}


def stack_accuracy(
    exports: Mapping[str, Path | Variant],
    images: ValImages,
    threads: int | None = None,
) -> dict:
    """Top-1 of every stack variant on ``images``: accuracy where labels exist, and agreement with
    the first (ONNX Runtime unpruned fp32) (``{"source", "images", "accuracy": {variant} | None, "top1_agreement"}``)."""
    top1 = {}
    for name, v in exports.items():
        with (v if isinstance(v, Variant) else Variant(Path(v))).open(threads=threads) as runner:
            top1[name] = run(runner, images.images).argmax(1)
    base = next(iter(top1.values()))
    accuracy = None if images.labels is None else {n: float((t == images.labels).mean()) for n, t in top1.items()}
    return {
        "source": images.source,
        "images": len(images.images),
        "accuracy": accuracy,
        "top1_agreement": {n: float((t == base).mean()) for n, t in top1.items()},
    }


def case_name(
    spec: ExportSpec,
    backend: str,
    threads: int | None,
    device: str = "cpu",
) -> str:
    """Readable name of what was measured, e.g. ``vit_base-colln-keep0.7-L3,6,9@onnxruntime-t1``
    (``...@torch-t1-cuda`` off the CPU; ``-t0``: the runtime's default thread count)."""
    layers = "" if spec.pruning.layers is None else "-L" + ",".join(str(i) for i in spec.pruning.layers)
    rounding = "" if spec.pruning.round_to == 1 else f"-r{spec.pruning.round_to}"
    where = "" if device == "cpu" else f"-{device}"
    return f"{default_out_dir(spec).name}{layers}{rounding}@{backend}-t{threads or 0}{where}"


def recorded_timing(
    recorded: dict,
    source: Path,
    export_dir: Path,
    backend: str = "onnxruntime",
    runtimes: Sequence[str] = (),
    device: str = "cpu",
    threads: int | None = None,
) -> Timing:
    """The timing of the regression file's case for this export, so that a check compares like
    with like (the thread count changes the ratios; the cases name theirs). ``threads``: the
    thread count asked for (0: the runtime's default), ``None`` when not asked: the case at the
    default's thread count if recorded, else the first recorded (the 1-thread cases of
    ``benchmarks/baselines``). RegressionFileError, before anything is timed, when ``recorded``
    (read from ``source``) has no such case."""
    spec = read_export(Path(export_dir))
    label = runtime_label(backend, runtimes)
    found: dict[int | None, Timing] = {}
    for case in recorded.get("cases", [recorded]):
        timing = Timing.from_dict(case)
        if case.get("case") == case_name(spec, label, timing.threads, device):
            found.setdefault(timing.threads, timing)
    wanted = Timing().threads if threads is None else (threads or None)
    timing = found.get(wanted, next(iter(found.values()), None) if threads is None else None)
    if timing is None:
        name = case_name(spec, label, wanted, device)
        raise RegressionFileError(f"{source} has no entry for {name}: record one with --save-baseline {source}")
    return timing


def check_regression_file(
    recorded: object,
    source: Path,
) -> dict:
    """``recorded`` (the parsed JSON of the regression file ``source``) when colln-bench can check
    against it, else RegressionFileError naming the first thing wrong, before anything is timed: an
    object with a list of ``cases`` (or a single colln-bench report), each with its ``case`` name, a
    readable timing and, per batch size, a finite ``speedup`` and ``efficiency`` >= 0."""

    def wrong(what: str) -> RegressionFileError:
        return RegressionFileError(f"{source} {what}, so it is no regression file: regenerate it with --save-baseline")

    if not isinstance(recorded, dict):
        raise wrong(f"holds a JSON {type(recorded).__name__}, not an object with cases")
    cases = recorded.get("cases", [recorded])
    if not isinstance(cases, list):
        raise wrong(f'has "cases": {json.dumps(cases)[:40]}, not a list of cases')
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or not isinstance(case.get("case"), str):
            raise wrong(f"has a case {i + 1} without a case name")
        where = f"case {case['case']}"
        try:
            Timing.from_dict(case)
        except (TypeError, ValueError, UsageError) as exc:
            raise wrong(f"{where} has an unreadable timing ({exc})") from exc
        batches = case.get("batches")
        if not isinstance(batches, dict) or not batches:
            raise wrong(f"{where} has no batches")
        for batch, row in batches.items():
            for metric in RATIO_METRICS:
                value = row.get(metric) if isinstance(row, dict) else None
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not number or not math.isfinite(value) or value < 0:
                    raise wrong(f"{where} batch {batch} has {metric} {json.dumps(value)}, not a number >= 0")
    return recorded


def find_case(
    recorded: dict,
    report: dict,
) -> dict | None:
    """The entry measured like ``report`` (same case), from a regression file (``cases``) or a
    single report."""
    cases = recorded.get("cases", [recorded])
    return next((c for c in cases if c.get("case") == report["case"]), None)


def regressions(
    report: dict,
    recorded_case: dict,
    tolerance: float,
) -> list[str]:
    """One line per ratio metric that fell below ``recorded * (1 - tolerance)`` at a batch size both
    measured."""
    found = []
    for batch, now in report["batches"].items():
        then = recorded_case["batches"].get(batch)
        if then is None:
            continue
        for metric in RATIO_METRICS:
            floor = then[metric] * (1.0 - tolerance)
            if not now[metric] >= floor:  # a NaN is never "no regression"
                found.append(
                    f"batch {batch} {metric} {now[metric]:.3f} < {floor:.3f} (recorded {then[metric]:.3f} - {tolerance:.0%})"
                )
    return found


def check_regressions(
    report: dict,
    recorded: dict,
    source: Path,
    tolerance: float,
) -> None:
    """Raise ValidationFailedError (exit 1) naming every ratio that regressed against the regression
    file ``recorded`` (read from ``source``); RegressionFileError when it has no entry for this case."""
    case = find_case(recorded, report)
    if case is None:
        raise RegressionFileError(f"{source} has no entry for {report['case']}: record one with --save-baseline {source}")
    found = regressions(report, case, tolerance)
    if found:
        raise ValidationFailedError(f"regression against {source}: " + "; ".join(found), stage="bench")


def merge_case(
    recorded: dict,
    report: dict,
) -> dict:
    """``recorded`` (a regression file's content, possibly empty) with ``report``'s case added or replaced."""
    cases = [c for c in recorded.get("cases", []) if c.get("case") != report["case"]]
    return {"machine": report["environment"]["machine"], "cases": sorted([*cases, report], key=lambda c: c["case"])}
