"""Where batch-1 time goes: per-node profiles of a pruned export and its unpruned counterpart on
ONNX Runtime (its profiler) and OpenVINO (the CPU plugin's PERF_COUNT, fp32 and bf16), grouped.

    python benchmarks/profile_b1.py EXPORT_DIR [--batch 1] [--runs 30] [--threads 2] [--json FILE] [--out FILE.md]
As run for docs/benchmarks.md#where-batch-1-time-goes (export: ``colln-export deit_small --weights
random --keep 0.7 --openvino --no-latency``; its unpruned counterpart and IR come from the export's
baseline cache, as colln-bench takes them):
    python benchmarks/profile_b1.py /tmp/colln-bench/deit_small-colln-keep0.7-openvino --runs 30 --threads 2 \\
        --json benchmarks/results/profile_b1_deit_small.json --out benchmarks/results/profile_b1_deit_small.md

The unpruned and the pruned model of each runtime and precision run alternately, in one process
(profiling perturbs timing: compare shares, never mix these milliseconds with colln-bench's).
Node time is grouped into categories common to both runtimes (:func:`category`); the selection
parts (score, topk, gather) are found as in ``benchmarks/profile_ort.py``. For each category,
``excess`` = pruned - unpruned / bound (ms): what the pruned model spends there beyond the FLOPs
share of the unpruned model's time; the excesses add up to the whole gap between the profiled
pruned time and the unpruned time / bound.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from profile_ort import selection_nodes

from colln.export.artifact import ORT_SESSION_OPTIONS, read_export
from colln.export.manifest import deployed
from colln.export.ort_graph import for_onnxruntime
from colln.export.precisions import VOCABULARY
from colln.export.spec import INPUT_NAME, ONNX_FILE
from colln.export.unpruned import default_cache
from colln.infer.environment import environment
from colln.measure.bench import stack_exports

LAYOUT = {
    "Transpose",
    "Reshape",
    "Slice",
    "Squeeze",
    "Unsqueeze",
    "Split",
    "Concat",
    "Reorder",
    "ReorderInput",
    "ReorderOutput",
    "Expand",
    "Flatten",
}
# ONNX Runtime's int8 products (MatMulIntegerToFloat, ...) included: a weight product at int8.
PRODUCTS = {"MatMul", "FusedMatMul", "Gemm", "FullyConnected", "Convolution", "Conv", "MatMulIntegerToFloat", "MatMulInteger"}
QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "FakeQuantize"}
NORMS = {"LayerNormalization", "SkipLayerNormalization", "MVN"}
ATTENTION = {"MultiHeadAttention", "Attention", "ScaledDotProductAttention"}


# The rows that together hold every attention's q·kᵀ, softmax and p·v, fused or not.
ATTENTION_ROWS = ("attention, fused", "attention products (explicit)", "softmax (explicit)")


def category(
    op: str,
    weights: bool,
    selection: str | None = None,
    softmax_inside: bool = False,
) -> str:
    """The row a node's time goes to: ``selection`` (score / topk / gather) first, then by op:
    products with a constant operand (the linear layers, patch embedding) apart from products of
    two activations (an explicit attention's q·kᵀ and p·v); a fused attention (ONNX Runtime's
    MultiHeadAttention, an OpenVINO Subgraph or SDPA holding a softmax); layout ops and reorders."""
    if selection:
        return f"selection: {selection}"
    if op in ATTENTION or (op == "Subgraph" and softmax_inside):
        return "attention, fused"
    if op in PRODUCTS:
        return "products, weights" if weights else "attention products (explicit)"
    if op == "Softmax":
        return "softmax (explicit)"
    if op in LAYOUT:
        return "layout (transpose, slice, reshape, reorder)"
    if op in NORMS:
        return "layer norm"
    if op in {"Gelu", "FastGelu", "Erf"}:
        return "gelu"
    if op == "Convert":
        return "precision converts"
    if op in QDQ:
        return "quantize / dequantize"
    if op in {"Add", "Mul", "Eltwise", "Subgraph", "BiasGelu"}:
        return "elementwise (add, mul, fused eltwise)"
    return f"other ({op})"


class OrtProfile:
    """An ONNX Runtime CPU session of the fused flavour colln runs
    (:func:`colln.export.ort_graph.for_onnxruntime`), profiled; :meth:`rows` gives the mean ms per
    run by :func:`category`."""

    def __init__(
        self,
        export_dir: Path,
        threads: int,
        tmp: Path,
    ) -> None:
        """``tmp``: where its profile and optimised graph go (a path prefix)."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        for key, value in ORT_SESSION_OPTIONS.items():
            options.add_session_config_entry(key, value)
        options.profile_file_prefix = f"{tmp}-ort"
        options.optimized_model_filepath = f"{tmp}-optimized.onnx"
        fused, _ = for_onnxruntime(onnx.load(str(Path(export_dir) / ONNX_FILE)))
        self.session = ort.InferenceSession(fused.SerializeToString(), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        parts = selection_nodes(graph)
        constants = {t.name for t in graph.initializer}
        self.categories = {
            n.name: category(n.op_type, any(i in constants for i in n.input), parts.get(n.name)) for n in graph.node
        }
        self.chw = self.session.get_inputs()[0].shape[1:]
        self.runs = 0

    def run(
        self,
        images: np.ndarray,
    ) -> None:
        self.session.run(None, {INPUT_NAME: images})
        self.runs += 1

    def rows(self) -> dict[str, float]:
        trace = json.loads(Path(self.session.end_profiling()).read_text())
        totals: dict[str, float] = collections.defaultdict(float)
        for event in trace:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                name = event["name"].removesuffix("_kernel_time")
                totals[self.categories.get(name, category(event["args"]["op_name"], False))] += event["dur"] / 1e3
        return {k: v / self.runs for k, v in totals.items()}  # every run is profiled, warm-up included


class OpenvinoProfile:
    """An export's IR compiled for the CPU at ``precision`` with the plugin's per-node performance
    counters; :meth:`rows` gives the mean ms per timed run by :func:`category` (``real_time`` of every
    executed node of the runtime graph)."""

    def __init__(
        self,
        export_dir: Path,
        precision: str,
        threads: int,
    ) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(deployed(export_dir, "openvino").path))
        config = {"INFERENCE_PRECISION_HINT": VOCABULARY[precision].openvino_hint, "PERF_COUNT": "YES"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(model, "CPU", config)
        # Selection parts by the original (ONNX-named) ops each runtime node was made from.
        original = _openvino_selection(model)
        self.categories = {}
        for node in compiled.get_runtime_model().get_ordered_ops():
            info = node.get_rt_info()
            kind = info["layerType"].astype(str)
            names = set(info["originalLayersNames"].astype(str).split(","))
            part = next((original[n] for n in names if n in original), None)
            weights = kind in PRODUCTS and kind != "MatMul"  # the plugin runs constant-weight products as FullyConnected
            # The plugin's attention fusion names the softmax it made ``Softmax_<id>``.
            self.categories[node.get_friendly_name()] = category(kind, weights, part, any(n.startswith("Softmax") for n in names))
        self.request = compiled.create_infer_request()
        self.chw = tuple(model.inputs[0].get_partial_shape())[1:]
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.runs = -1  # the first run compiles: not counted

    def run(
        self,
        images: np.ndarray,
    ) -> None:
        self.request.infer({0: images})
        self.runs += 1
        if self.runs:
            for info in self.request.profiling_info:
                if info.status == info.Status.EXECUTED:
                    row = self.categories.get(info.node_name, category(info.node_type, False))
                    self.totals[row] += info.real_time.total_seconds() * 1e3

    def rows(self) -> dict[str, float]:
        return {k: v / self.runs for k, v in self.totals.items()}


def _openvino_selection(
    model,
) -> dict[str, str]:
    """Friendly name -> score / topk / gather, by the same walk as ONNX Runtime's graph (the IR's
    friendly names are the ONNX node names)."""
    graph = onnx.GraphProto()
    for op in model.get_ordered_ops():
        node = graph.node.add()
        node.name, node.op_type = op.get_friendly_name(), op.get_type_name()
        node.input.extend(
            f"{v.get_node().get_friendly_name()}:{v.get_index()}" for v in (i.get_source_output() for i in op.inputs())
        )
        node.output.extend(f"{op.get_friendly_name()}:{i}" for i in range(op.get_output_size()))
    return selection_nodes(graph)


def _images(
    chw,
    batch: int,
) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, *(int(str(d)) for d in chw)), dtype=np.float32)


def profiles(
    export_dir: Path,
    batch: int,
    runs: int,
    threads: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{"<runtime>:<precision>": {"unpruned": rows, "pruned": rows}}`` (rows: category -> ms).
    The unpruned and the pruned model of a case run alternately, so that a change of the machine's
    load hits both alike."""
    spec = read_export(export_dir)
    variants = stack_exports(spec, export_dir, default_cache(export_dir), runtimes=("onnxruntime", "openvino"))
    cases: dict[str, dict[str, Path]] = collections.defaultdict(dict)
    for name, variant in variants.items():
        kind, precision = name.split(":")[-1].split("-", 1)
        cases[f"{variant.backend}:{precision}"][kind] = variant.directory
    out: dict[str, dict[str, dict[str, float]]] = {}
    for case, dirs in cases.items():
        runtime, precision = case.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            if runtime == "onnxruntime":
                made = {kind: OrtProfile(d, threads, Path(tmp) / kind) for kind, d in dirs.items()}
            else:
                made = {kind: OpenvinoProfile(d, precision, threads) for kind, d in dirs.items()}
            images = _images(made["pruned"].chw, batch)
            for _ in range(runs + 1):
                for profiler in made.values():
                    profiler.run(images)
            out[case] = {kind: profiler.rows() for kind, profiler in made.items()}
    return out


def markdown(
    results: dict[str, dict[str, dict[str, float]]],
    bound: float,
    title: str,
) -> str:
    lines = [title, ""]
    for case, pair in results.items():
        unpruned, pruned = pair["unpruned"], pair["pruned"]
        total_u, total_p = sum(unpruned.values()), sum(pruned.values())
        keys = sorted(set(unpruned) | set(pruned), key=lambda k: -(pruned.get(k, 0.0) - unpruned.get(k, 0.0) / bound))
        gap = total_p - total_u / bound
        lines += [
            f"**{case}**: unpruned {total_u:.2f} ms, pruned {total_p:.2f} ms, profiled speedup {total_u / total_p:.3f}x,"
            f" bound {bound:.3f}x, efficiency {total_u / total_p / bound:.3f}; gap to the bound {gap:.2f} ms",
            "",
            "| category | unpruned ms | pruned ms | excess ms (pruned - unpruned / bound) | share of the gap |",
            "|---|---|---|---|---|",
        ]
        for k in keys:
            u, p = unpruned.get(k, 0.0), pruned.get(k, 0.0)
            excess = p - u / bound
            lines.append(f"| {k} | {u:.2f} | {p:.2f} | {excess:+.2f} | {excess / gap:+.0%} |")
        u, p = (sum(rows.get(k, 0.0) for k in ATTENTION_ROWS) for rows in (unpruned, pruned))
        lines += ["", f"Attention in all its forms ({', '.join(ATTENTION_ROWS)}): unpruned {u:.2f} ms, pruned {p:.2f} ms,"]
        lines += [f"excess {p - u / bound:+.2f} ms ({(p - u / bound) / gap:+.0%} of the gap).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--out", type=Path, help="also write the markdown tables here")
    args = p.parse_args(argv)
    spec = read_export(args.export)
    bound = spec.keep_plan().flops().bound
    load_before = os.getloadavg()
    results = profiles(args.export, args.batch, args.runs, args.threads)
    title = f"{spec.model}, {spec.keep_plan().token_steps}, batch {args.batch}, {args.threads} threads, {args.runs} profiled runs"
    text = markdown(results, bound, title)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        record = {"title": title, "bound": bound, "batch": args.batch, "threads": args.threads, "runs": args.runs}
        record["environment"] = environment("onnxruntime,openvino", args.threads, load_before)
        args.json.write_text(json.dumps({**record, "profiles": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
