"""What every measured speedup must satisfy, whatever the machine's noise."""

from __future__ import annotations

from colln.infer.timing import plausible_speedup


def assert_plausible_speedup(
    entry: dict,
    bound: float,
) -> None:
    """``entry`` (``speedup``, ``speedup_iqr``) is the median of its own interquartile range, and a
    ratio of two latencies of comparable graphs: in colln's plausible range
    (:data:`colln.infer.timing.PLAUSIBLE_SPEEDUP`, outside which colln-bench calls the measurement
    failed) -- a unit mix-up (ms over s, a factor of 1000) breaks it. Whether the ratio is the right
    way up and of the right pair is the job of a graph whose speedup is known
    (``test_speedups_of_graphs_whose_speedup_is_known`` in tests/test_bench.py)."""
    q25, q75 = entry["speedup_iqr"]
    assert q25 <= entry["speedup"] <= q75, entry
    assert plausible_speedup(entry["speedup"], bound), (entry["speedup"], bound)
