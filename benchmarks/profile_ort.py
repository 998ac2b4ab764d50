"""Where the time goes in an export on ONNX Runtime CPU: per-op-type totals from ORT's profiler.

    python benchmarks/profile_ort.py EXPORT_DIR [EXPORT_DIR ...] [--batch 8] [--runs 5] [--threads 1] [--out FILE.md]
As ``benchmarks/run_all.sh`` runs it (sections pruning and int8):
    python benchmarks/profile_ort.py /tmp/colln-bench/deit_small-cls-keep0.7 /tmp/colln-bench/deit_small-colln-keep0.7 \\
        --batch 8 --runs 10 --out benchmarks/results/profile_deit_small_b8.md
    python benchmarks/profile_ort.py /tmp/colln-bench/deit_small-colln-keep0.7-int8 --batch 8 \\
        --out benchmarks/results/profile_deit_small_int8_b8.md

Each export is profiled in its own session (profiling perturbs timing, so compare the shares, not
the milliseconds, and never mix these runs into colln-bench numbers). The table groups node time
by op type, then attributes node time to the token selection in the graph ORT actually ran (its
optimised model): ``score`` = the nodes from the head-mean ReduceMean to each TopK, ``topk``,
``gather`` = the nodes from TopK to the gathered tokens' Concat.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from colln.export.spec import INPUT_NAME, ONNX_FILE
from colln.infer.runners import session_model

SELECTION_PARTS = ("score", "topk", "gather")
# The ops that read tokens (or RoPE rows) at the kept indices: the gather walk ends with them. What
# follows carries activations, not indices, and is the model's own work: a tower without a prefix
# token has no Concat to stop at, and its gathered RoPE rows feed every later block.
GATHER_OPS = ("Gather", "GatherElements", "GatherND")
# Guards, not counted: a walk that met none of the above still never takes in the model's products.
GATHER_ENDS = ("LayerNormalization", "SkipLayerNormalization", "MatMul", "Softmax")


def profile(
    export_dir: Path,
    batch: int,
    runs: int,
    threads: int,
) -> dict[str, float]:
    """Mean microseconds per inference by op type, plus ``selection:<part>`` totals (see module doc),
    over ``runs`` profiled runs after one warm-up."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        model = session_model(Path(export_dir) / ONNX_FILE, fuse=True)  # what colln's ONNX Runtime runner loads
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        parts = selection_nodes(onnx.load(options.optimized_model_filepath, load_external_data=False).graph)
        shape = session.get_inputs()[0].shape[1:]
        feed = {INPUT_NAME: np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)}
        session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = collections.defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
            part = parts.get(event["name"].removesuffix("_kernel_time"))
            if part:
                totals[f"selection:{part}"] += event["dur"]
    n = runs + 1  # the warm-up run is profiled too
    return {key: us / n for key, us in sorted(totals.items(), key=lambda kv: -kv[1])}


def selection_nodes(graph: onnx.GraphProto) -> dict[str, str]:
    """Node name -> ``score`` / ``topk`` / ``gather`` for the token selection of every pruning block."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def ancestors(node: onnx.NodeProto, stop: str) -> list[onnx.NodeProto]:
        seen, stack, found = set(), [node], []
        while stack:
            cur = stack.pop()
            for name in cur.input:
                up = producer.get(name)
                if up is not None and up.name not in seen:
                    seen.add(up.name)
                    found.append(up)
                    if up.op_type != stop:
                        stack.append(up)
        return found

    parts: dict[str, str] = {}
    for topk in (n for n in graph.node if n.op_type == "TopK"):
        parts[topk.name] = "topk"
        # Score: walk up from TopK to the head-mean ReduceMean (stopping at Softmax, i.e. the attention).
        chain = ancestors(topk, stop="Softmax")
        if any(n.op_type == "ReduceMean" for n in chain):
            for n in chain:
                if n.op_type not in ("Softmax", "Constant") and n.input:
                    parts.setdefault(n.name, "score")
        # Gather: walk down from the indices through index arithmetic to the ops that gather with them.
        stack = list(consumers[topk.output[1]])
        while stack:
            cur = stack.pop()
            if cur.name in parts or cur.op_type in GATHER_ENDS:
                continue
            parts[cur.name] = "gather"
            if cur.op_type not in GATHER_OPS:
                for out in cur.output:
                    stack.extend(consumers[out])
    return parts


def markdown(
    results: dict[str, dict[str, float]],
    batch: int,
    threads: int,
) -> str:
    keys = sorted({op for r in results.values() for op in r}, key=lambda op: -max(r.get(op, 0.0) for r in results.values()))
    ops = [k for k in keys if not k.startswith("selection:")] + [f"selection:{p}" for p in SELECTION_PARTS]
    names = list(results)
    lines = [
        f"ORT CPU profile, batch {batch}, intra-op threads {threads}, ms per inference (share of node time)",
        "",
        "| op | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    totals = {n: sum(v for k, v in results[n].items() if not k.startswith("selection:")) for n in names}
    for op in ops:
        cells = [f"{results[n].get(op, 0.0) / 1e3:.2f} ({results[n].get(op, 0.0) / totals[n]:.1%})" for n in names]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.insert(
        4 + len(ops) - len(SELECTION_PARTS), "| **total** | " + " | ".join(f"{totals[n] / 1e3:.2f}" for n in names) + " |"
    )
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
