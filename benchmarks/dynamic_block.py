"""Does ONNX Runtime's dynamic work split help in the VM's slow state? host_modes.py's blocks, with
every export in two or three sessions that differ only in ``session.dynamic_block_base`` (0 = ORT's
default static split; N > 0: work handed out in shrinking blocks, so a faster thread takes more).

    python benchmarks/dynamic_block.py UNPRUNED PRUNED --batch 1 --blocks 25 --rounds 8 [--bases 0,4,1]

Prints each session's median per block and the unpruned / pruned ratio per base
(results/dynamic_block_deit_small.txt).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from colln.app.cli import parse_ints
from colln.export.spec import INPUT_NAME, ONNX_FILE
from colln.export.triton import tensor_specs
from colln.infer.runners import session_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("unpruned", type=Path)
    parser.add_argument("pruned", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--bases", default="0,4,1", help="session.dynamic_block_base values (0: ORT's default)")
    args = parser.parse_args()
    bases = parse_ints(args.bases, "--bases")

    sessions = {}
    for label, export in (("unpruned", args.unpruned), ("pruned", args.pruned)):
        model = session_model(export / ONNX_FILE, fuse=True)  # what colln's ONNX Runtime runner loads
        for base in bases:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.add_session_config_entry("session.force_spinning_stop", "1")  # as colln's runner
            if base:
                options.add_session_config_entry("session.dynamic_block_base", str(base))
            sessions[(label, base)] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    (_, _, dims), *_ = tensor_specs(args.unpruned)[0]
    feed = {INPUT_NAME: np.random.default_rng(0).standard_normal((args.batch, *dims)).astype(np.float32)}
    for session in sessions.values():  # warm-up
        session.run(None, feed)
    print(f"batch {args.batch}, threads default; ms per session, then unpruned / pruned per dynamic_block_base")
    for block in range(args.blocks):
        times: dict[tuple[str, int], list[float]] = {key: [] for key in sessions}
        for _ in range(args.rounds):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                times[key].append((time.perf_counter() - start) * 1e3)
        ms = {key: statistics.median(t) for key, t in times.items()}
        cells = "  ".join(f"{label}-b{base} {value:.1f}" for (label, base), value in ms.items())
        ratios = "  ".join(f"b{base} {ms[('unpruned', base)] / ms[('pruned', base)]:.2f}x" for base in bases)
        print(f"{block:3d}  {cells} | {ratios}", flush=True)


if __name__ == "__main__":
    main()
