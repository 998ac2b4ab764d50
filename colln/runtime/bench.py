"""``colln-bench``'s measurement: an export against its unpruned counterpart, interleaved, per batch
size, with the keep plan's FLOPs bound; and the regression check of its ratios against a baseline."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from colln.errors import BaselineError, ValidationFailedError
from colln.export.artifact import default_out_dir, read_export
from colln.export.spec import INPUT_NAME, ExportSpec
from colln.runtime.baseline import default_cache, unpruned_engine, unpruned_export
from colln.runtime.environment import environment
from colln.runtime.runners import open_runner
from colln.runtime.timing import measure

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
) -> dict:
    """Benchmark an export against its unpruned counterpart, interleaved, per batch size.

    Returns the JSON-ready report: per batch the latency stats of both, ``speedup`` (median of the
    paired per-round ratios, with its interquartile range), the keep plan's FLOPs ``bound`` and
    ``efficiency = speedup / bound``; plus the spec, plan and environment. ``threads=0`` leaves the
    backend's own default."""
    export_dir = Path(export_dir)
    spec = read_export(export_dir)
    plan = spec.keep_plan()
    flops = plan.flops()
    base_dir = unpruned_export(spec, cache if cache is not None else default_cache(export_dir))
    if backend == "tensorrt":
        unpruned_engine(export_dir, base_dir)
    load_before = os.getloadavg()
    with (
        open_runner(base_dir, backend, device, threads or None) as unpruned,
        open_runner(export_dir, backend, device, threads or None) as pruned,
    ):
        chw = pruned.get_input_metadata()[INPUT_NAME].shape[1:]
        compared = measure({"unpruned": unpruned, "pruned": pruned}, chw, batches, rounds, warmup)
    results = {}
    for b, comparison in compared.items():
        row = comparison.pair()
        results[str(b)] = {**row, "bound": flops.bound, "efficiency": row["speedup"] / flops.bound}
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
        "rounds": rounds,
        "warmup": warmup,
        "batches": results,
        "environment": environment(backend, threads, load_before),
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
    baseline: dict,
    report: dict,
) -> dict | None:
    """The baseline entry measured like ``report`` (same case), from a baseline file (``cases``) or
    a single report."""
    cases = baseline.get("cases", [baseline])
    return next((c for c in cases if c.get("case") == report["case"]), None)


def regressions(
    report: dict,
    baseline_case: dict,
    tolerance: float,
) -> list[str]:
    """One line per ratio metric that fell below ``baseline * (1 - tolerance)`` at a batch size both
    measured."""
    found = []
    for batch, now in report["batches"].items():
        then = baseline_case["batches"].get(batch)
        if then is None:
            continue
        for metric in RATIO_METRICS:
            floor = then[metric] * (1.0 - tolerance)
            if now[metric] < floor:
                found.append(
                    f"batch {batch} {metric} {now[metric]:.3f} < {floor:.3f} (baseline {then[metric]:.3f} - {tolerance:.0%})"
                )
    return found


def check_baseline(
    report: dict,
    baseline: dict,
    source: Path,
    tolerance: float,
) -> None:
    """Raise ValidationFailedError (exit 1) naming every ratio that regressed against ``baseline``
    (read from ``source``); BaselineError when it has no entry for this case."""
    case = find_case(baseline, report)
    if case is None:
        raise BaselineError(f"{source} has no entry for {report['case']}: record one with --save-baseline {source}")
    found = regressions(report, case, tolerance)
    if found:
        raise ValidationFailedError(f"regression against {source}: " + "; ".join(found), stage="bench")


def merge_case(
    baseline: dict,
    report: dict,
) -> dict:
    """``baseline`` (a baseline file's content, possibly empty) with ``report``'s case added or replaced."""
    cases = [c for c in baseline.get("cases", []) if c.get("case") != report["case"]]
    return {"machine": report["environment"]["machine"], "cases": sorted([*cases, report], key=lambda c: c["case"])}
