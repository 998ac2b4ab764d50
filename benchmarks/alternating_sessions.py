"""Why batch 1 at 2 threads lost the pruned model's advantage: ONNX Runtime sessions run
back to back (one session, repeated) against alternating (unpruned, pruned, unpruned, ...: what an
interleaved benchmark, or a server with several models, does), per spinning setting. Each setting
gets its own pair of sessions, created and timed one setting at a time so that no other setting's
thread pool is alive while it is timed.

    python benchmarks/alternating_sessions.py UNPRUNED_EXPORT PRUNED_EXPORT [--batch 1] [--rounds 8] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from colln.export.spec import INPUT_NAME, ONNX_FILE

SETTINGS = {
    "spinning (ORT default)": {},
    "session.force_spinning_stop=1": {"session.force_spinning_stop": "1"},
    "session.intra_op.allow_spinning=0": {"session.intra_op.allow_spinning": "0"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("unpruned", type=Path)
    p.add_argument("pruned", type=Path)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads, 0 = ONNX Runtime's default")
    args = p.parse_args()
    graph_input = onnx.load(str(args.pruned / ONNX_FILE), load_external_data=False).graph.input[0]
    shape = [d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:]]
    feed = {INPUT_NAME: np.random.default_rng(0).standard_normal((args.batch, *shape), dtype=np.float32)}

    def session(path: Path, entries: dict[str, str]) -> ort.InferenceSession:
        options = ort.SessionOptions()
        if args.threads:
            options.intra_op_num_threads = args.threads
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        return ort.InferenceSession(str(path / ONNX_FILE), options, providers=["CPUExecutionProvider"])

    def ms(s: ort.InferenceSession) -> float:
        start = time.perf_counter()
        s.run(None, feed)
        return (time.perf_counter() - start) * 1e3

    print(f"batch {args.batch}, threads {args.threads or 'default'}, {args.rounds} rounds, load {os.getloadavg()[0]:.2f}")
    for label, entries in SETTINGS.items():
        u, q = session(args.unpruned, entries), session(args.pruned, entries)
        for _ in range(2):
            ms(u), ms(q)
        alone_u = np.median([ms(u) for _ in range(args.rounds)])
        alone_q = np.median([ms(q) for _ in range(args.rounds)])
        pairs = np.array([(ms(u), ms(q)) for _ in range(args.rounds)])
        print(
            f"{label:34s} back to back: unpruned {alone_u:7.1f} ms, pruned {alone_q:7.1f} ms, ratio {alone_u / alone_q:.2f} | "
            f"alternating: unpruned {np.median(pairs[:, 0]):7.1f} ms, pruned {np.median(pairs[:, 1]):7.1f} ms, "
            f"ratio {np.median(pairs[:, 0] / pairs[:, 1]):.2f}"
        )
        del u, q
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
