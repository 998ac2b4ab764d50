"""The same interleaved comparison repeated in blocks for a while, one line per block: shows when
the machine changes speed under a run.

    python benchmarks/host_modes.py BASELINE_DIR EXPORT_DIR [EXPORT_DIR ...] [--batch 1] [--blocks 20]
        [--rounds 8] [--threads 0[,2,...]] [--split on[,off]] [--rtt]

Each block times every export ``--rounds`` times, interleaved, and prints the medians and each
export's speedup over the first. With several ``--threads`` settings every export runs under each,
all interleaved, and speedups are over the baseline at the same setting (``0`` = ONNX Runtime's
default, which pins its worker threads to cores; an explicit count leaves them unpinned); so with
``--split on,off`` (``on``: a batch of at least as many images as threads runs as one slice per
thread, colln's default; ``off``: every op is split across the threads). On this
project's 2-vCPU VMs the 2-thread numbers switch between two levels within one process, for
seconds to minutes at a time (docs/benchmarks.md): a single colln-bench run lands in one or the
other, so quote the blocks, not one number. ``--rtt`` adds, before each block, the round trip of a
cache line between vCPU 0 and vCPU 1 (``vcpu_rtt.c``, built with ``cc``): about 130 ns in the fast
state, about 350 ns in the slow one, when the host has put the two vCPUs on different dies.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from colln.export.spec import INPUT_NAME, ONNX_FILE
from colln.export.triton import tensor_specs
from colln.infer.runners import onnxruntime_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", type=Path, help="export directories; the first is the baseline")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=8, help="timed runs of each export per block")
    parser.add_argument(
        "--threads", default="0", help="ONNX Runtime intra-op threads, comma-separated settings (0 = its default)"
    )
    parser.add_argument("--split", default="on", help="batch slices per thread: on, off or on,off (default on)")
    parser.add_argument("--rtt", action="store_true", help="print the vCPU 0 <-> 1 cache-line round trip per block")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    splits = [{"on": True, "off": False}[v] for v in args.split.split(",")]
    settings = [(threads, split) for threads in thread_counts for split in splits]
    probe = build_rtt_probe(parser) if args.rtt else None

    runners = {}
    for threads, split in settings:
        for export in args.exports:
            runner = onnxruntime_runner(export / ONNX_FILE, threads=threads or None, split_batches=split)
            runner.activate()
            suffix = f"@t{threads}" if len(thread_counts) > 1 else ""
            suffix += ("@split" if split else "@ops") if len(splits) > 1 else ""
            runners[export.name + suffix] = runner
    (_, _, dims), *_ = tensor_specs(args.exports[0])[0]
    feed = {INPUT_NAME: np.random.default_rng(0).standard_normal((args.batch, *dims)).astype(np.float32)}
    for runner in runners.values():  # warm-up
        runner.infer(feed)
    label = "default" if thread_counts == [0] else args.threads
    baseline = args.exports[0].name
    print(f"batch {args.batch}, threads {label}, split {args.split}; ms (speedup over {baseline} in the same setting)")
    for block in range(args.blocks):
        rtt = f"  rtt {round_trip(probe)} ns" if probe else ""
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
        print(f"{block:3d}  {cells}{rtt}", flush=True)
    for runner in runners.values():
        runner.deactivate()


def build_rtt_probe(
    parser: argparse.ArgumentParser,
) -> str:
    """``vcpu_rtt.c`` built into a temp dir (removed at exit); the path of the binary."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        parser.error("--rtt needs a C compiler (cc)")
    out = Path(tempfile.mkdtemp(prefix="colln-rtt-")) / "vcpu_rtt"
    subprocess.run([compiler, "-O2", "-pthread", "-o", str(out), str(Path(__file__).with_name("vcpu_rtt.c"))], check=True)
    atexit.register(shutil.rmtree, out.parent, ignore_errors=True)
    return str(out)


def round_trip(
    probe: str,
) -> str:
    return subprocess.run([probe, "0.2"], capture_output=True, text=True, check=True).stdout.strip()


if __name__ == "__main__":
    main()
