"""Latency measurement that stays honest on noisy machines: every variant is timed in the same run,
interleaved round by round after a warm-up, so machine load drifts hit all of them alike and their
ratios (speedups) are stable even when absolute milliseconds are not.

:func:`measure` is the one measurement colln-export, colln-bench and colln-eval share, and
:class:`Timing` its one configuration (rounds, warm-up, threads), with one set of defaults.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from polygraphy.backend.base import BaseRunner

from colln.errors import UsageError
from colln.export.spec import INPUT_NAME

BUDGET_S = 20.0
MIN_ROUNDS, MAX_ROUNDS = 5, 50
# Where the speedup of one ViT graph over a comparable one can lie, whatever the machine's noise:
# above the lowest ratio, below this multiple of the FLOPs bound. A few rounds on 2 shared cores
# under load measured a keep-0.7 speedup of 0.22, and 4.9 at digits_vit's bound of 1.51; int8 and
# OpenVINO reach 7.7x at a bound of 1.53. Outside it the measurement failed (an oversubscribed
# machine, a unit mix-up), and the figure is no result.
PLAUSIBLE_SPEEDUP = (0.05, 10.0)


@dataclass(frozen=True)
class Timing:
    """How colln-export, colln-bench and colln-eval time their variants: one set of defaults.

    ``rounds``: timed rounds per batch size, every variant once per round in a shuffled order;
    ``None``: as many as fit in ``budget_s`` (``MIN_ROUNDS`` to ``MAX_ROUNDS``), so a command
    finishes in bounded time whatever the model (a ViT-B round at batch 8 takes seconds on a CPU).
    ``warmup``: untimed rounds first, per batch size: OpenVINO compiles on its first call (about 10x
    a steady one) and ONNX Runtime grows its memory arena over the first calls at a new batch size
    (up to 1.5x for two or three calls); 5 covers both with a margin.
    ``threads``: intra-op threads of every runtime; ``None`` (or 0): the runtime's default, what a
    deployment runs with (the physical cores); 1 gives figures that do not depend on the core
    count (the regression file's cases and docs/benchmarks.md are 1-thread figures).
    ``split_batches``: see :func:`colln.infer.runners.onnxruntime_runner`.
    """

    rounds: int | None = None
    warmup: int = 5
    threads: int | None = None
    split_batches: bool = True
    budget_s: float = BUDGET_S

    def __post_init__(self) -> None:
        if (self.rounds is not None and self.rounds < 1) or self.warmup < 0:
            raise UsageError(f"rounds must be >= 1 and warmup >= 0, got rounds={self.rounds}, warmup={self.warmup}")
        if self.threads is not None and self.threads < 0:
            raise UsageError(f"threads must be >= 0 (0 = the runtime's default), got {self.threads}")
        if self.budget_s <= 0:
            raise UsageError(f"the timing budget must be positive, got {self.budget_s} s")
        # 0 is the command line's spelling of the runtime's default: one value for it.
        object.__setattr__(self, "threads", self.threads or None)

    def to_dict(self) -> dict:
        """The ``timing`` field of report.json, colln-bench's report and results.json."""
        return asdict(self)

    @classmethod
    def from_dict(
        cls,
        data: dict,
    ) -> Timing:
        """A report's ``timing``, or the top-level ``rounds`` / ``warmup`` / ``threads`` of a
        colln-bench report written before it had one (threads 0: the runtime's default)."""
        if "timing" in data:
            return cls(**data["timing"])
        threads = data.get("threads")
        return cls(
            rounds=data.get("rounds"),
            warmup=data.get("warmup", cls.warmup),
            threads=threads if isinstance(threads, int) else None,
            split_batches=data.get("split_batches", cls.split_batches),
        )

    def describe(self) -> str:
        """``rounds auto (5..50 in ~20 s per batch), warm-up 5, threads runtime default``."""
        rounds = self.rounds or f"auto ({MIN_ROUNDS}..{MAX_ROUNDS} in ~{self.budget_s:g} s per batch)"
        split = "" if self.split_batches else ", no batch split"
        return f"rounds {rounds}, warm-up {self.warmup}, threads {self.threads or 'runtime default'}{split}"


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
    ) -> LatencyStats:
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


def paired_speedup(
    baseline_s: np.ndarray,
    candidate_s: np.ndarray,
) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile of the per-round ratios ``baseline / candidate``: each ratio
    compares two calls made back to back, so load drifts that hit both cancel."""
    ratios = np.asarray(baseline_s) / np.asarray(candidate_s)
    p50, p25, p75 = np.percentile(ratios, [50, 25, 75])
    return float(p50), float(p25), float(p75)


def plausible_speedup(
    speedup: float,
    bound: float,
) -> bool:
    """Whether a measured ``speedup`` lies in :data:`PLAUSIBLE_SPEEDUP` for a keep plan whose FLOPs
    bound is ``bound`` (a NaN never does)."""
    lowest, multiple = PLAUSIBLE_SPEEDUP
    return lowest < speedup < multiple * bound


@dataclass(frozen=True)
class Comparison:
    """One batch size: every runner's latency, and each runner's paired speedup over the baseline
    (median and interquartile range of the per-round ratios)."""

    batch: int
    stats: dict[str, LatencyStats]
    speedups: dict[str, tuple[float, float, float]]
    # Per-round seconds of every runner (entry r of each from the same round): any pair can be compared.
    times: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def pair(
        self,
        name: str = "pruned",
        baseline: str = "unpruned",
    ) -> dict:
        """``{baseline: stats, name: stats, "speedup", "speedup_iqr"}`` as JSON-ready dicts."""
        speedup, q25, q75 = self.speedups[name]
        return {
            baseline: self.stats[baseline].to_dict(),
            name: self.stats[name].to_dict(),
            "speedup": speedup,
            "speedup_iqr": [q25, q75],
        }


def measure(
    runners: Mapping[str, BaseRunner],
    input_shape: Sequence[int],
    batches: Sequence[int],
    timing: Timing | None = None,
    baseline: str = "unpruned",
    sample: np.ndarray | None = None,
) -> dict[int, Comparison]:
    """Time every (active) runner interleaved, per batch size, and pair each with ``baseline``,
    as ``timing`` says (``None``: :class:`Timing`'s defaults; its threads are the runners' own,
    set when they were opened).

    The feed is ``sample`` (real images, tiled to the batch size) or standard-normal noise of
    ``input_shape``: ViT latency does not depend on pixel values. ``rounds=None`` picks, per batch
    size, as many rounds as fit in the budget, judged from one untimed call of each runner (which
    counts as the first warm-up round).
    """
    timing = timing if timing is not None else Timing()
    if baseline not in runners:
        raise UsageError(f"no {baseline!r} runner to compare against (have {', '.join(runners)})")
    if min(batches, default=0) < 1:
        raise UsageError(f"batch sizes must be >= 1, got {list(batches)}")
    rng = np.random.default_rng(0)
    out: dict[int, Comparison] = {}
    for b in batches:
        if sample is not None:
            images = np.concatenate([sample] * -(-b // len(sample)))[:b]
        else:
            images = rng.standard_normal((b, *input_shape), dtype=np.float32)
        feed = {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)}
        n, extra_warmup = timing.rounds, timing.warmup
        if n is None:
            first = sum(timed_infer(r, feed) for r in runners.values())
            n, extra_warmup = int(np.clip(timing.budget_s / first, MIN_ROUNDS, MAX_ROUNDS)), max(timing.warmup - 1, 0)
        times = interleaved_times(runners, feed, n, extra_warmup)
        out[b] = Comparison(
            batch=b,
            stats={name: LatencyStats.from_times(t, b) for name, t in times.items()},
            speedups={name: paired_speedup(times[baseline], t) for name, t in times.items() if name != baseline},
            times=times,
        )
    return out
