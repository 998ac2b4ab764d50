"""One 2-thread session against two 1-thread sessions running at once (one per vCPU), in blocks:
whether the second vCPU adds compute, or only a session that shares each op's data slows down.

    python benchmarks/two_sessions.py EXPORT_DIR [--batch 1] [--blocks 80] [--seconds 0.5] [--rtt]

Per block, for ``--seconds`` each: the export on ONNX Runtime's default threads with every op split
between them (``split_batches=False``); then two single-thread sessions at once, one thread pinned
to each vCPU; then each alone. Prints the medians (and, with ``--rtt``, the vCPU 0 <-> 1 cache-line
round trip, see ``host_modes.py``). On this project's VMs the 2-thread time falls to the 1-thread
time exactly when the round trip rises to ~350 ns, while the two 1-thread sessions keep their
1-thread speed side by side (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
from host_modes import build_rtt_probe, round_trip

from colln.export.spec import INPUT_NAME, ONNX_FILE
from colln.export.triton import tensor_specs
from colln.infer.runners import onnxruntime_runner

CPUS = (0, 1)


def timed(runner, feed: dict, seconds: float, cpu: int | None, out: dict, key: object) -> None:
    """Median ms of ``runner`` over ``seconds``, this thread pinned to ``cpu`` when given."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        runner.infer(feed)
        times.append((time.perf_counter() - start) * 1e3)
    out[key] = statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="an export directory")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement (default 0.5)")
    parser.add_argument("--rtt", action="store_true", help="print the vCPU 0 <-> 1 cache-line round trip per block")
    args = parser.parse_args()
    every_cpu = os.sched_getaffinity(0)
    if not set(CPUS) <= every_cpu:
        parser.error(f"needs vCPUs {CPUS}; this process may run on {sorted(every_cpu)}")
    probe = build_rtt_probe(parser) if args.rtt else None

    path = args.export / ONNX_FILE
    shared = onnxruntime_runner(path, split_batches=False)
    singles = [onnxruntime_runner(path, threads=1) for _ in CPUS]
    for runner in (shared, *singles):
        runner.activate()
    (_, _, dims), *_ = tensor_specs(args.export)[0]
    feed = {INPUT_NAME: np.random.default_rng(0).standard_normal((args.batch, *dims)).astype(np.float32)}
    for runner in (shared, *singles):
        runner.infer(feed)
    print(f"batch {args.batch}; ms: 2-thread session | two 1-thread sessions at once | each alone")
    for block in range(args.blocks):
        rtt = f"  rtt {round_trip(probe)} ns" if probe else ""
        results: dict = {}
        timed(shared, feed, args.seconds, None, results, "shared")
        side_by_side = [
            threading.Thread(target=timed, args=(singles[i], feed, args.seconds, cpu, results, ("both", cpu)))
            for i, cpu in enumerate(CPUS)
        ]
        for thread in side_by_side:
            thread.start()
        for thread in side_by_side:
            thread.join()
        for i, cpu in enumerate(CPUS):
            timed(singles[i], feed, args.seconds / 2, cpu, results, ("alone", cpu))
        os.sched_setaffinity(0, every_cpu)
        both = "  ".join(f"vCPU {cpu} {results['both', cpu]:.1f}" for cpu in CPUS)
        alone = "  ".join(f"vCPU {cpu} {results['alone', cpu]:.1f}" for cpu in CPUS)
        print(f"{block:3d}  2-thread {results['shared']:.1f} | at once: {both} | alone: {alone}{rtt}", flush=True)
    for runner in (shared, *singles):
        runner.deactivate()


if __name__ == "__main__":
    main()
