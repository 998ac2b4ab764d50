"""The int8 stack timed one variant at a time (each warm, alone in the process) instead of
interleaved: what a server running only that model sees, caches included. Complements colln-bench,
whose interleaving cancels load drift but lets each variant evict the others' weights from the L3.

    python benchmarks/one_at_a_time.py INT8_EXPORT [--batch 1] [--threads 0] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

import colln  # noqa: F401  (before polygraphy, as the commands do)
from colln.export.artifact import read_export
from colln.export.spec import INPUT_NAME
from colln.export.unpruned import default_cache
from colln.infer.runners import open_runner
from colln.infer.timing import timed_infer
from colln.measure.bench import stack_exports


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir", type=Path)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads, 0 = ONNX Runtime's default")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    exports = stack_exports(read_export(args.export_dir), args.export_dir, default_cache(args.export_dir))
    print(f"batch {args.batch}, threads {args.threads or 'default'}, load {os.getloadavg()[0]:.2f}")
    times = {}
    for name, path in exports.items():
        with open_runner(path, "onnxruntime", threads=args.threads or None) as runner:
            shape = runner.get_input_metadata(use_numpy_dtypes=False)[INPUT_NAME].shape[1:]
            feed = {INPUT_NAME: np.random.default_rng(0).standard_normal((args.batch, *shape), dtype=np.float32)}
            for _ in range(3):
                runner.infer(feed)
            times[name] = float(np.median([timed_infer(runner, feed) for _ in range(args.rounds)])) * 1e3
    base = next(iter(times.values()))
    for name, ms in times.items():
        print(f"{name:14s} {ms:8.1f} ms  {base / ms:.2f}x")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
