"""The strongly typed fp16 graph: which tensors are fp16 and which stay fp32 (read from the graph's
own types), float32 I/O, constant K and metadata kept, ONNX Runtime output close to fp32, and
colln-export --precision fp16 validating with the fp16 tolerances."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from colln.app.export_cli import main
from colln.data import preprocess
from colln.export.onnx import topk_constants
from colln.export.precision import fp32_nodes, to_fp16
from colln.models import bundled


@pytest.fixture(scope="module")
def graphs(digits_export: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    fp32 = onnx.load(str(digits_export / "model.onnx"))
    return fp32, to_fp16(fp32)


def _types(proto: onnx.ModelProto) -> dict[str, int]:
    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def test_fp32_islands_and_fp16_elsewhere(graphs) -> None:
    _, half = graphs
    onnx.checker.check_model(half, full_check=True)
    types = _types(half)
    nodes = list(half.graph.node)
    for node in nodes:
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert types[node.input[0]] == TensorProto.FLOAT and types[node.output[0]] == TensorProto.FLOAT, node.name
        if node.op_type == "TopK":
            assert types[node.input[0]] in (TensorProto.FLOAT, TensorProto.INT64), node.name
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            assert all(types[x] == TensorProto.FLOAT16 for x in node.input if x), node.name
    # The Col-Ln score: every float tensor from a Softmax to the TopK that ranks it is fp32.
    producer = {o: n for n in nodes for o in n.output}
    for topk in (n for n in nodes if n.op_type == "TopK"):
        todo, seen = [topk.input[0]], set()
        while todo:
            name = todo.pop()
            node = producer.get(name)
            if name in seen or node is None or node.op_type == "Softmax":
                continue
            seen.add(name)
            if types.get(name) in (TensorProto.FLOAT, TensorProto.FLOAT16):
                assert types[name] == TensorProto.FLOAT, f"{name} on the score path of {topk.name} is not fp32"
            todo.extend(node.input)
    ((inp,), (out,)) = half.graph.input, half.graph.output
    assert (inp.name, out.name) == ("images", "logits")
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == TensorProto.FLOAT


def test_weights_halve_and_plan_survives(graphs) -> None:
    full, half = graphs
    assert topk_constants(half) == topk_constants(full) == [45, 32, 23]
    assert {p.key: p.value for p in half.metadata_props} == {p.key: p.value for p in full.metadata_props}
    weights = [sum(len(t.raw_data) for t in g.graph.initializer) for g in (full, half)]
    assert weights[1] < 0.6 * weights[0]  # fp16 weights; only LayerNorm's stay fp32


def test_score_subgraph_excludes_matrix_products(graphs) -> None:
    full, _ = graphs
    kept = [full.graph.node[i].op_type for i in fp32_nodes(full.graph)]
    assert {"Softmax", "LayerNormalization", "TopK", "ReduceSum", "ReduceMean"} <= set(kept)
    assert not {"MatMul", "Gemm", "Conv", "Add"} & set(kept)


def test_fp16_logits_close_to_fp32(graphs) -> None:
    full, half = graphs
    x = preprocess(bundled.load_split("test").images[:32], bundled.create_model()).numpy()
    a = ort.InferenceSession(full.SerializeToString()).run(None, {"images": x})[0]
    b = ort.InferenceSession(half.SerializeToString()).run(None, {"images": x})[0]
    assert b.dtype == np.float32
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.995 and np.abs(a - b).max() < 0.05 * max(1.0, np.abs(a).max())


def test_export_fp16_validates_with_fp16_tolerances(tmp_path: Path, digits_weights: str) -> None:
    out = tmp_path / "fp16"
    argv = ["digits_vit", "--precision", "fp16", "--weights", digits_weights, "--out", str(out), "--val-limit", "96"]
    assert main([*argv, "--latency-batches", "2", "--latency-rounds", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    v = report["validation"]
    assert report["export"]["precision"] == v["precision"] == "fp16" and v["passed"]
    assert v["tolerances"] == {"min_cosine": 0.995, "logit_rtol": 0.05, "tie_rtol": 0.01}
    types = _types(onnx.load(str(out / "model.onnx")))
    assert TensorProto.FLOAT16 in types.values()
