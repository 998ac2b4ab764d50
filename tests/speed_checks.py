"""What every measured speedup must satisfy, whatever the machine's noise."""

from __future__ import annotations


def assert_plausible_speedup(
    entry: dict,
    bound: float,
) -> None:
    """``entry`` (``speedup``, ``speedup_iqr``) is the median of its own interquartile range, and a
    ratio of two latencies of comparable graphs: within (0.05, 10 x the FLOPs ``bound``) -- a unit
    mix-up (ms over s, a factor of 1000) breaks it. Only that wide: a few rounds on 2 shared cores
    under load measured a keep-0.7 speedup of 0.22, and 4.9 at digits_vit's bound of 1.51. Whether the ratio is the right
    way up and of the right pair is the job of a graph whose speedup is known
    (``test_speedups_of_graphs_whose_speedup_is_known`` in tests/test_bench.py)."""
    q25, q75 = entry["speedup_iqr"]
    assert q25 <= entry["speedup"] <= q75, entry
    assert 0.05 < entry["speedup"] < 10 * bound, (entry["speedup"], bound)
