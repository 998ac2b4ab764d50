"""Latency measurement that stays honest on noisy machines: every variant is timed in the same run,
interleaved round by round after a warm-up, so machine load drifts hit all of them alike and their
ratios (speedup) are stable even when absolute milliseconds are not.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from polygraphy.backend.base import BaseRunner

from colln.errors import UsageError
from colln.export.spec import INPUT_NAME


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


def interleaved_latency(
    runners: Mapping[str, BaseRunner],
    feed: dict[str, np.ndarray],
    rounds: int,
    warmup: int,
    seed: int = 0,
) -> dict[str, LatencyStats]:
    """Time every (active) runner ``rounds`` times on ``feed``, one call each per round in a freshly
    shuffled order (so no variant always runs right after another), after ``warmup`` untimed rounds.
    Batch size is the feed's first dimension."""
    if rounds < 1 or warmup < 0:
        raise UsageError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    if not runners:
        raise UsageError("nothing to time: give at least one runner")
    batch = int(feed.get(INPUT_NAME, next(iter(feed.values()))).shape[0])
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
    return {name: LatencyStats.from_times(times[name], batch) for name in runners}
