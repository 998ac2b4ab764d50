"""What every measured speedup must satisfy, whatever the machine's noise."""

from __future__ import annotations


def assert_plausible_speedup(
    entry: dict,
    bound: float,
) -> None:
    """``entry`` (``speedup``, ``speedup_iqr``) is the median of its own interquartile range, and a
    ratio of two latencies of comparable graphs: within (0.1, 3 x the FLOPs ``bound``) -- a unit
    mix-up (ms over s) or a latency given as the speedup breaks it. Only that wide: a few rounds on
    2 shared cores under load measured a keep-0.7 speedup of 0.22. Whether the ratio is the right
    way up and of the right pair is the job of a graph whose speedup is known
    (``test_speedups_of_graphs_whose_speedup_is_known`` in tests/test_bench.py)."""
    q25, q75 = entry["speedup_iqr"]
    assert q25 <= entry["speedup"] <= q75, entry
    assert 0.1 < entry["speedup"] < 3 * bound, (entry["speedup"], bound)
