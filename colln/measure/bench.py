"""``colln-bench``'s measurement: an export against its unpruned counterpart, interleaved, per batch
size, with the keep plan's FLOPs bound; and the regression check of its ratios against a regression
file (the ratios recorded earlier: colln-bench ``--save-baseline`` / ``--baseline``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch import nn

from colln.data import ValImages
from colln.errors import RegressionFileError, ValidationFailedError
from colln.export.artifact import default_out_dir, read_export
from colln.export.spec import INPUT_NAME, ExportSpec
from colln.export.unpruned import cached_export, default_cache, unpruned_engine, unpruned_export
from colln.infer.environment import environment
from colln.infer.runners import open_runner, run
from colln.infer.timing import Comparison, LatencyStats, measure, paired_speedup

RATIO_METRICS = ("speedup", "efficiency")


def bench_export(
    export_dir: Path,
    backend: str = "onnxruntime",
    batches: Sequence[int] = (1, 8, 32),
    rounds: int = 50,
    warmup: int = 10,
    threads: int = 1,
    cache: Path | None = None,
    device: str = "cpu",
    split_batches: bool = True,
) -> dict:
    """Benchmark an export against its unpruned counterpart, interleaved, per batch size.

    Returns the JSON-ready report: per batch the latency stats of both, ``speedup`` (median of the
    paired per-round ratios, with its interquartile range), the keep plan's FLOPs ``bound`` and
    ``efficiency = speedup / bound``; plus the spec, plan and environment. ``threads=0`` leaves the
    backend's own default; ``split_batches``: see :func:`colln.infer.runners.onnxruntime_runner`."""
    export_dir = Path(export_dir)
    spec = read_export(export_dir)
    plan = spec.keep_plan()
    flops = plan.flops()
    cache = cache if cache is not None else default_cache(export_dir)
    base_dir = unpruned_export(spec, cache)
    if backend == "tensorrt":
        unpruned_engine(export_dir, base_dir)
    load_before = os.getloadavg()
    # An int8 export on ONNX Runtime is timed in its stack: fp32 and int8, pruned and unpruned, one run.
    stacked = spec.precision == "int8" and backend == "onnxruntime"
    exports = stack_exports(spec, export_dir, cache) if stacked else {"unpruned": base_dir, "pruned": export_dir}
    compared = measure_exports(exports, batches, rounds, warmup, backend, device, threads or None, split_batches)
    results = {}
    for b, row in latency_rows(compared).items():
        results[b] = {**row, "bound": flops.bound, "efficiency": row["speedup"] / flops.bound}
    return {
        "case": case_name(spec, backend, threads, device),
        "export": str(export_dir),
        "unpruned_export": str(base_dir),
        "spec": {k: v for k, v in spec.to_dict().items() if k != "plan"},
        "plan": str(plan),
        "flops": flops.to_dict(),
        "backend": backend,
        "device": device,
        "threads": threads,
        "split_batches": split_batches,
        "rounds": rounds,
        "warmup": warmup,
        "batches": results,
        "stack": stack_latency(compared, flops.bound) if stacked else None,
        "environment": environment(backend, threads, load_before),
    }


def measure_exports(
    exports: Mapping[str, Path],
    batches: Sequence[int],
    rounds: int | None,
    warmup: int,
    backend: str = "onnxruntime",
    device: str = "cpu",
    threads: int | None = None,
    split_batches: bool = True,
) -> dict[int, Comparison]:
    """One interleaved run of ``exports`` (name -> export directory; the first is the baseline):
    ``{"unpruned", "pruned"}``, or an int8 export's :data:`STACK`."""
    with contextlib.ExitStack() as active:
        runners = {
            name: active.enter_context(open_runner(d, backend, device, threads, split_batches=split_batches))
            for name, d in exports.items()
        }
        chw = next(iter(runners.values())).get_input_metadata(use_numpy_dtypes=False)[INPUT_NAME].shape[1:]
        return measure(runners, chw, batches, rounds, warmup, baseline=next(iter(runners)))


def latency_rows(
    compared: Mapping[int, Comparison],
) -> dict[str, dict]:
    """Per batch size, pruned against unpruned (for an int8 stack: pruned int8 against unpruned int8)."""
    return {str(b): stack_pair(c) if STACK[-1] in c.times else c.pair() for b, c in compared.items()}


# The int8 stack, in table order; speedups are over the first.
STACK = ("unpruned-fp32", "pruned-fp32", "unpruned-int8", "pruned-int8")


def stack_exports(
    spec: ExportSpec,
    export_dir: Path,
    cache: Path,
    unpruned: nn.Module | None = None,
    calibration: np.ndarray | None = None,
) -> dict[str, Path]:
    """The four exports of an int8 export's stack (:data:`STACK`): its fp32 and int8 unpruned
    baselines and its pruned fp32 counterpart come from (or go into) the unpruned-export ``cache``. The
    unpruned int8 one is calibrated on ``calibration`` (``None``: the default images), which
    should be what the pruned export was calibrated on."""
    fp32 = replace(spec, precision="fp32", plan={})
    return {
        "unpruned-fp32": unpruned_export(fp32, cache, unpruned),
        "pruned-fp32": cached_export(fp32, cache, unpruned),
        "unpruned-int8": unpruned_export(spec, cache, unpruned, calibration),
        "pruned-int8": Path(export_dir),
    }


def stack_pair(
    comparison: Comparison,
) -> dict:
    """The classic ``{unpruned, pruned, speedup, speedup_iqr}`` row of an int8 export: pruned int8
    against unpruned int8, paired from the stack's run."""
    speedup, q25, q75 = paired_speedup(comparison.times["unpruned-int8"], comparison.times["pruned-int8"])
    return {
        "unpruned": comparison.stats["unpruned-int8"].to_dict(),
        "pruned": comparison.stats["pruned-int8"].to_dict(),
        "speedup": speedup,
        "speedup_iqr": [q25, q75],
    }


def stack_latency(
    compared: Mapping[int, Comparison],
    bound: float,
) -> dict:
    """``{"baseline", "variants", "flops_bound", "batches": {"<b>": {variant: LatencyStats + speedup,
    speedup_iqr}}}``: every variant's paired speedup over unpruned fp32 from the same run."""
    batches = {}
    for b, c in compared.items():
        base = c.times[STACK[0]]
        rows = {}
        for name in STACK:
            speedup, q25, q75 = paired_speedup(base, c.times[name])
            rows[name] = {**LatencyStats.to_dict(c.stats[name]), "speedup": speedup, "speedup_iqr": [q25, q75]}
        batches[str(b)] = rows
    return {"baseline": STACK[0], "variants": list(STACK), "flops_bound": bound, "batches": batches}


def stack_accuracy(
    exports: Mapping[str, Path],
    images: ValImages,
    threads: int | None = None,
) -> dict:
    """Top-1 of every stack variant (ONNX Runtime) on ``images``: accuracy where labels exist, and
    agreement with unpruned fp32 (``{"source", "images", "accuracy": {variant} | None, "top1_agreement"}``)."""
    top1 = {}
    for name, directory in exports.items():
        with open_runner(directory, "onnxruntime", threads=threads) as runner:
            top1[name] = run(runner, images.images).argmax(1)
    base = top1[STACK[0]]
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
    threads: int,
    device: str = "cpu",
) -> str:
    """Readable name of what was measured, e.g. ``vit_base-colln-keep0.7-L3,6,9@onnxruntime-t1``
    (``...@torch-t1-cuda`` off the CPU)."""
    layers = "" if spec.pruning.layers is None else "-L" + ",".join(str(i) for i in spec.pruning.layers)
    rounding = "" if spec.pruning.round_to == 1 else f"-r{spec.pruning.round_to}"
    where = "" if device == "cpu" else f"-{device}"
    return f"{default_out_dir(spec).name}{layers}{rounding}@{backend}-t{threads}{where}"


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
            if now[metric] < floor:
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
