"""The same interleaved comparison repeated in blocks for a while, one line per block: shows when
the machine changes speed under a run.

    python benchmarks/host_modes.py BASELINE_DIR EXPORT_DIR [EXPORT_DIR ...] [--batch 1] [--blocks 20]
        [--rounds 8] [--threads 0[,2,...]]

Each block times every export ``--rounds`` times, interleaved, and prints the medians and each
export's speedup over the first. With several ``--threads`` settings every export runs under each,
all interleaved, and speedups are over the baseline at the same setting (``0`` = ONNX Runtime's
default, which pins its worker threads to cores; an explicit count leaves them unpinned). On this
project's 2-vCPU VMs the 2-thread numbers switch between two levels within one process, for
seconds to minutes at a time (benchmarks/README.md): a single colln-bench run lands in one or the
other, so quote the blocks, not one number.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from colln.export.spec import INPUT_NAME, ONNX_FILE
from colln.runtime.runners import onnxruntime_runner
from colln.runtime.triton import tensor_specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", type=Path, help="export directories; the first is the baseline")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=8, help="timed runs of each export per block")
    parser.add_argument(
        "--threads", default="0", help="ONNX Runtime intra-op threads, comma-separated settings (0 = its default)"
    )
    args = parser.parse_args()
    settings = [int(t) for t in args.threads.split(",")]

    runners = {}
    for threads in settings:
        for export in args.exports:
            runner = onnxruntime_runner(export / ONNX_FILE, threads=threads or None)
            runner.activate()
            runners[export.name if len(settings) == 1 else f"{export.name}@t{threads}"] = runner
    (_, _, dims), *_ = tensor_specs(args.exports[0])[0]
    feed = {INPUT_NAME: np.random.default_rng(0).standard_normal((args.batch, *dims)).astype(np.float32)}
    for runner in runners.values():  # warm-up
        runner.infer(feed)
    label = "default" if settings == [0] else args.threads
    print(f"batch {args.batch}, threads {label}; ms (speedup over {args.exports[0].name} at the same threads)")
    for block in range(args.blocks):
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                start = time.perf_counter()
                runner.infer(feed)
                times[name].append((time.perf_counter() - start) * 1e3)
        medians = list(zip(runners, (statistics.median(t) for t in times.values()), strict=True))
        per_setting = len(args.exports)
        cells = "  ".join(
            f"{name} {ms:.1f} ({medians[i - i % per_setting][1] / ms:.2f}x)" for i, (name, ms) in enumerate(medians)
        )
        print(f"{block:3d}  {cells}", flush=True)
    for runner in runners.values():
        runner.deactivate()


if __name__ == "__main__":
    main()
