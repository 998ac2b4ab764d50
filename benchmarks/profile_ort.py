"""Where the time goes in an export on ONNX Runtime CPU: per-op-type totals from ORT's profiler.

    python benchmarks/profile_ort.py EXPORT_DIR [EXPORT_DIR ...] [--batch 8] [--runs 5] [--threads 1] [--out FILE.md]

Each export is profiled in its own session (profiling perturbs timing, so compare the shares, not
the milliseconds, and never mix these runs into colln-bench numbers). The table groups node time
by op type and adds the share of the ops that token pruning brings (score, top-k, gather).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from colln.export.spec import INPUT_NAME, ONNX_FILE

# Ops that only the pruning blocks add (the rest of a ViT graph is MatMul, Softmax, norms, GELU).
PRUNING_OPS = ("ReduceMean", "Pow", "ReduceSum", "TopK", "GatherElements", "Gather", "Expand", "Unsqueeze", "Concat", "ScatterElements")


def profile(
    export_dir: Path,
    batch: int,
    runs: int,
    threads: int,
) -> dict[str, float]:
    """Mean microseconds per inference, by op type, over ``runs`` profiled runs after one warm-up."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(Path(export_dir) / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        shape = session.get_inputs()[0].shape[1:]
        feed = {INPUT_NAME: np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)}
        session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    model_runs = [e for e in trace if e.get("name") == "model_run"]
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    # The first model_run is the warm-up: drop its share proportionally.
    total_runs = len(model_runs)
    return {op: us / total_runs for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])}


def markdown(
    results: dict[str, dict[str, float]],
    batch: int,
    threads: int,
) -> str:
    ops = sorted({op for r in results.values() for op in r}, key=lambda op: -max(r.get(op, 0.0) for r in results.values()))
    names = list(results)
    lines = [
        f"ORT CPU profile, batch {batch}, intra-op threads {threads}, ms per inference (share of node time)",
        "",
        "| op | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    totals = {n: sum(results[n].values()) for n in names}
    for op in ops:
        cells = [f"{results[n].get(op, 0.0) / 1e3:.2f} ({results[n].get(op, 0.0) / totals[n]:.1%})" for n in names]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"{totals[n] / 1e3:.2f}" for n in names) + " |")
    pruning = [sum(results[n].get(op, 0.0) for op in PRUNING_OPS) for n in names]
    lines.append("| pruning ops | " + " | ".join(f"{p / 1e3:.2f} ({p / totals[n]:.1%})" for p, n in zip(pruning, names)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exports", nargs="+", type=Path)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    results = {d.name: profile(d, args.batch, args.runs, args.threads) for d in args.exports}
    text = markdown(results, args.batch, args.threads)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
