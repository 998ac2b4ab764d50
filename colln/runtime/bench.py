"""Latency measurement that stays honest on noisy machines: every variant is timed in the same run,
interleaved round by round after a warm-up, so machine load drifts hit all of them alike and their
ratios (speedup) are stable even when absolute milliseconds are not.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner

from colln.errors import UsageError
from colln.export.spec import INPUT_NAME, ONNX_FILE, ExportSpec


@dataclass(frozen=True)
class LatencyStats:
    """Latency percentiles of one runner over ``rounds`` timed calls, and its throughput at ``batch``."""

    batch: int
    rounds: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float

    @classmethod
    def from_times(
        cls,
        times_s: np.ndarray,
        batch: int,
    ) -> "LatencyStats":
        """Stats of per-call times in seconds; throughput is taken at the median (robust to outliers)."""
        ms = np.asarray(times_s, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(
            batch=batch,
            rounds=len(ms),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p99_ms=float(p99),
            mean_ms=float(ms.mean()),
            images_per_s=float(batch * 1e3 / p50),
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def timed_infer(
    runner: BaseRunner,
    feed: dict[str, np.ndarray],
) -> float:
    """Seconds one inference took: the runner's own timer around the backend call when it keeps one
    (excludes polygraphy's input checks), wall time otherwise."""
    start = time.perf_counter()
    runner.infer(feed)
    wall = time.perf_counter() - start
    own = getattr(runner, "inference_time", None)
    return float(own) if own is not None and 0 < own <= wall else wall


def interleaved_times(
    runners: Mapping[str, BaseRunner],
    feed: dict[str, np.ndarray],
    rounds: int,
    warmup: int,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per-call seconds of every (active) runner on ``feed``: ``rounds`` rounds of one call each, in
    a freshly shuffled order per round (so no variant always follows another), after ``warmup``
    untimed rounds. Entry ``r`` of every array comes from the same round: ratios can be paired."""
    if rounds < 1 or warmup < 0:
        raise UsageError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    if not runners:
        raise UsageError("nothing to time: give at least one runner")
    names = list(runners)
    order = random.Random(seed)
    for _ in range(warmup):
        for name in names:
            runners[name].infer(feed)
    times = {name: np.empty(rounds) for name in names}
    for r in range(rounds):
        order.shuffle(names)
        for name in names:
            times[name][r] = timed_infer(runners[name], feed)
    return {name: times[name] for name in runners}


def interleaved_latency(
    runners: Mapping[str, BaseRunner],
    feed: dict[str, np.ndarray],
    rounds: int,
    warmup: int,
) -> dict[str, LatencyStats]:
    """:func:`interleaved_times` summarised per runner; batch size is the feed's first dimension."""
    batch = feed_batch(feed)
    return {name: LatencyStats.from_times(t, batch) for name, t in interleaved_times(runners, feed, rounds, warmup).items()}


def feed_batch(
    feed: dict[str, np.ndarray],
) -> int:
    return int(feed.get(INPUT_NAME, next(iter(feed.values()))).shape[0])


def paired_speedup(
    baseline_s: np.ndarray,
    candidate_s: np.ndarray,
) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile of the per-round ratios ``baseline / candidate``: each ratio
    compares two calls made back to back, so load drifts that hit both cancel."""
    ratios = np.asarray(baseline_s) / np.asarray(candidate_s)
    p50, p25, p75 = np.percentile(ratios, [50, 25, 75])
    return float(p50), float(p25), float(p75)


def pruned_vs_unpruned(
    pruned: BaseRunner,
    unpruned: BaseRunner,
    feed: dict[str, np.ndarray],
    rounds: int,
    warmup: int,
) -> dict:
    """Both (active) runners interleaved on ``feed``: their stats as dicts, ``speedup`` (median
    paired ratio unpruned / pruned) and its interquartile range ``speedup_iqr``."""
    times = interleaved_times({"unpruned": unpruned, "pruned": pruned}, feed, rounds, warmup)
    speedup, q25, q75 = paired_speedup(times["unpruned"], times["pruned"])
    batch = feed_batch(feed)
    return {
        "unpruned": LatencyStats.from_times(times["unpruned"], batch).to_dict(),
        "pruned": LatencyStats.from_times(times["pruned"], batch).to_dict(),
        "speedup": speedup,
        "speedup_iqr": [q25, q75],
    }


def unpruned_export(
    export_dir: Path,
    cache: Path | None = None,
) -> Path:
    """The unpruned counterpart of an export (its spec with keep 1.0), exported once into ``cache``
    (default ``EXPORT_DIR/../.colln-cache``) and reused while its spec still matches."""
    from colln.export.pipeline import atomic_output, export_into

    spec = ExportSpec.read(export_dir)
    base = spec.unpruned()
    # Only what changes the unpruned graph names the cache entry (not the metric, not the weights).
    key = json.dumps([base.model, base.img_size, base.precision, base.opset])
    cache = Path(cache) if cache is not None else Path(export_dir).resolve().parent / ".colln-cache"
    out = cache / f"{base.model}-keep1-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    if (out / ONNX_FILE).is_file() and _same_graph(ExportSpec.read(out), base):
        return out
    with atomic_output(out, force=True) as tmp:
        export_into(base, tmp)
    return out


def unpruned_engine(
    export_dir: Path,
    base_dir: Path,
) -> None:
    """Give the cached unpruned export a TensorRT engine with the pruned engine's batch profile
    (built once, then reused while it matches)."""
    from colln.export.tensorrt import PLAN_FILE, build_engine, read_plan_metadata

    profile = read_plan_metadata(export_dir)["profile"]
    if (base_dir / PLAN_FILE).is_file() and read_plan_metadata(base_dir)["profile"] == profile:
        return
    build_engine(base_dir, batch_min=profile["min"][0], batch_opt=profile["opt"][0], batch_max=profile["max"][0])


def _same_graph(
    a: ExportSpec,
    b: ExportSpec,
) -> bool:
    return replace(a, weights=None, metric="colln") == replace(b, weights=None, metric="colln")


def export_runner(
    export_dir: Path,
    backend: str,
    threads: int,
    device: str = "cpu",
) -> BaseRunner:
    """A runner for an export with ``threads`` intra-op threads pinned (0 = the backend's default)
    on ``device`` (``cpu`` or ``cuda``, for the torch and onnxruntime backends)."""
    from colln.runtime.runners import load

    if backend == "torch" and threads:
        import torch

        torch.set_num_threads(threads)
    return load(export_dir, backend=backend, device=device, threads=threads or None)


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
    spec = ExportSpec.read(export_dir)
    plan = spec.keep_plan()
    flops = plan.flops()
    base_dir = unpruned_export(export_dir, cache)
    if backend == "tensorrt":
        unpruned_engine(export_dir, base_dir)
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    with (
        export_runner(base_dir, backend, threads, device) as unpruned,
        export_runner(export_dir, backend, threads, device) as pruned,
    ):
        chw = tuple(pruned.get_input_metadata()[INPUT_NAME].shape[1:])
        rng = np.random.default_rng(0)
        for b in batches:
            feed = {INPUT_NAME: rng.standard_normal((b, *chw), dtype=np.float32)}
            row = pruned_vs_unpruned(pruned, unpruned, feed, rounds, warmup)
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
    from colln.export.pipeline import default_out_dir

    layers = "" if spec.layers is None else "-L" + ",".join(str(i) for i in spec.layers)
    rounding = "" if spec.round_to == 1 else f"-r{spec.round_to}"
    where = "" if device == "cpu" else f"-{device}"
    return f"{default_out_dir(spec).name}{layers}{rounding}@{backend}-t{threads}{where}"


def machine_id() -> str:
    """Baseline file stem for this machine: ``$COLLN_MACHINE``, else CPU model and core count
    (ratios carry over between machines of one kind, not across kinds)."""
    if os.environ.get("COLLN_MACHINE"):
        return os.environ["COLLN_MACHINE"]
    slug = re.sub(r"[^a-z0-9]+", "-", _cpu_model().lower()).strip("-") or platform.machine()
    return f"{slug}-{os.cpu_count()}cpu"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(
    backend: str,
    threads: int,
    load_before: tuple[float, float, float] | None = None,
) -> dict:
    """Versions, threads and machine: what a latency number is only valid for. The load averages
    before and after say how busy the machine was."""
    versions = {"python": platform.python_version()}
    for pkg in ("colln", "numpy", "torch", "timm", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
    return {
        "machine": machine_id(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "backend": backend,
        "threads": threads or "backend default",
        "versions": versions,
        "loadavg_before": list(load_before) if load_before else None,
        "loadavg_after": list(os.getloadavg()),
    }


RATIO_METRICS = ("speedup", "efficiency")


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


def merge_case(
    baseline: dict,
    report: dict,
) -> dict:
    """``baseline`` (a baseline file's content, possibly empty) with ``report``'s case added or replaced."""
    cases = [c for c in baseline.get("cases", []) if c.get("case") != report["case"]]
    return {"machine": report["environment"]["machine"], "cases": sorted([*cases, report], key=lambda c: c["case"])}
