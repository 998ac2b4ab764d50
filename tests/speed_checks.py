"""What every measured speedup and latency record must satisfy, whatever the machine's noise."""

from __future__ import annotations

import pytest


def assert_plausible_speedup(
    entry: dict,
    bound: float,
) -> None:
    """``entry`` (``speedup``, ``speedup_iqr``) is the median of its own interquartile range, and a
    ratio of two latencies of comparable graphs: within a factor of 100 of the FLOPs bound either
    way, so a unit mix-up (ms over s, a factor of 1000) breaks it while a loaded machine's noise on
    a few rounds of a tiny model does not (a median of 14x at a bound of 1.29 was seen on a 2-vCPU
    machine at load 8, outside colln-bench's own :data:`colln.infer.timing.PLAUSIBLE_SPEEDUP`).
    Whether the ratio is the right way up and of the right pair is the job of a graph whose speedup
    is known (``test_speedups_of_graphs_whose_speedup_is_known`` in tests/test_bench.py)."""
    q25, q75 = entry["speedup_iqr"]
    assert q25 <= entry["speedup"] <= q75, entry
    assert bound / 100 < entry["speedup"] < bound * 100, (entry["speedup"], bound)


def assert_latency_stats(
    stats: dict,
    *,
    batch: int,
    rounds: int,
) -> None:
    """``stats`` (a LatencyStats dict) is what ``rounds`` timed calls at ``batch`` give: percentiles
    in order, the mean inside their range, the throughput ``batch`` images over the median call.
    With two rounds, numpy's percentiles interpolate between the two calls: the median is their
    mean and p90 - p50 is 0.40 / 0.49 of p99 - p50. A swapped percentile, a throughput per call
    instead of per image or a figure from another batch breaks it."""
    assert stats["batch"] == batch and stats["rounds"] == rounds, stats
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"], stats
    # The mean of n <= 50 calls lies between the fastest call and p99 (p99 is at least 1/n of the way
    # from the second-slowest call to the slowest).
    assert stats["mean_ms"] <= stats["p99_ms"] * (1 + 1e-9), stats
    assert stats["images_per_s"] == pytest.approx(batch * 1e3 / stats["p50_ms"], rel=1e-6), stats
    if rounds == 2:
        assert stats["mean_ms"] == pytest.approx(stats["p50_ms"], rel=1e-9)
        spread = stats["p99_ms"] - stats["p50_ms"]
        assert stats["p90_ms"] - stats["p50_ms"] == pytest.approx(spread * 0.40 / 0.49, rel=1e-6, abs=1e-12)
