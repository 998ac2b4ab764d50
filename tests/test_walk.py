"""The selection-path walker (colln.export.walk) on one hand-made graph, written once as ONNX and
once as an OpenVINO model: the same nodes must come out of both adapters.

The graph, by node name (``a -> b``: b reads a)::

    x -> qk (MatMul) -> softmax -> mean (ReduceMean) -> add (Add) -> add2 (Add) -> topk (TopK)
    softmax -> av (MatMul) -> post (Relu);  softmax -> tail (Abs)
    y -> relu (Relu) -> add;  y -> softmax2 -> p (MatMul) -> r (ReduceSum) -> add2

Only softmax, mean, add, add2 and topk are on the path: av / post and tail lead to no TopK,
relu starts at no Softmax, softmax2's way to the TopK passes a product."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from colln.export.precision import fp32_nodes
from colln.export.walk import DIALECTS, OnnxView, OpenVinoView, reach, selection_path

PATH = {"softmax", "mean", "add", "add2", "topk"}


def _onnx_graph() -> onnx.GraphProto:
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w"], ["qk_out"], name="qk"),
        n("Softmax", ["qk_out"], ["s"], name="softmax", axis=-1),
        n("MatMul", ["s", "w"], ["av_out"], name="av"),
        n("Relu", ["av_out"], ["post_out"], name="post"),
        n("Abs", ["s"], ["tail_out"], name="tail"),
        n("ReduceMean", ["s", "axes"], ["mean_out"], name="mean", keepdims=0),
        n("Relu", ["y"], ["relu_out"], name="relu"),
        n("Add", ["mean_out", "relu_out"], ["add_out"], name="add"),
        n("Softmax", ["y"], ["s2"], name="softmax2", axis=-1),
        n("MatMul", ["s2", "w"], ["p_out"], name="p"),
        n("ReduceSum", ["p_out", "axes"], ["r_out"], name="r", keepdims=0),
        n("Add", ["add_out", "r_out"], ["add2_out"], name="add2"),
        n("TopK", ["add2_out", "k"], ["values", "indices"], name="topk", axis=-1),
    ]
    f = TensorProto.FLOAT
    return helper.make_graph(
        nodes,
        "walk",
        [helper.make_tensor_value_info("x", f, [4, 4]), helper.make_tensor_value_info("y", f, [4, 4])],
        [helper.make_tensor_value_info(name, f, None) for name in ("post_out", "tail_out", "values")]
        + [helper.make_tensor_value_info("indices", TensorProto.INT64, None)],
        [
            numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "k"),
        ],
    )


def _openvino_model():
    ov = pytest.importorskip("openvino")
    ops = pytest.importorskip("openvino.opset13")

    def named(node, name: str):
        node.set_friendly_name(name)
        return node

    x = ops.parameter([4, 4], np.float32, name="x")
    y = ops.parameter([4, 4], np.float32, name="y")
    w = ops.constant(np.eye(4, dtype=np.float32))
    axes = ops.constant(np.array([0], dtype=np.int64))
    softmax = named(ops.softmax(named(ops.matmul(x, w, False, False), "qk"), -1), "softmax")
    post = named(ops.relu(named(ops.matmul(softmax, w, False, False), "av")), "post")
    tail = named(ops.abs(softmax), "tail")
    add = named(ops.add(named(ops.reduce_mean(softmax, axes, False), "mean"), named(ops.relu(y), "relu")), "add")
    p = named(ops.matmul(named(ops.softmax(y, -1), "softmax2"), w, False, False), "p")
    add2 = named(ops.add(add, named(ops.reduce_sum(p, axes, False), "r")), "add2")
    topk = named(ops.topk(add2, ops.constant(np.int64(2)), -1, "max", "value"), "topk")
    return ov.Model([post.output(0), tail.output(0), topk.output(1)], [x, y])


def test_onnx_selection_path() -> None:
    graph = _onnx_graph()
    view = OnnxView(graph)
    assert {view.name(i) for i in selection_path(view)} == PATH
    # fp16's keep-float rule: the path plus every Softmax, LayerNorm and TopK.
    assert {graph.node[i].name for i in fp32_nodes(graph)} == PATH | {"softmax2"}


def test_openvino_selection_path() -> None:
    view = OpenVinoView(_openvino_model())
    assert {view.name(n) for n in selection_path(view)} == PATH


def test_openvino_adds_the_score_product() -> None:
    from colln.export.openvino import selection_path as ir_selection_path

    # The IR's float scope also holds the q·kᵀ MatMul whose Softmax feeds the score.
    assert ir_selection_path(_openvino_model()) == PATH | {"qk"}


def test_reach_lists_a_product_but_does_not_pass_it() -> None:
    view = OnnxView(_onnx_graph())
    index = {view.name(i): i for i in view.nodes()}
    products = DIALECTS["onnx"].products
    below = [view.name(i) for i in reach(view, [index["softmax"]], down=True, stop=products)]
    assert below[0] == "softmax" and set(below) == {"softmax", "av", "tail", "mean", "add", "add2", "topk"}
    # A start that is a product is listed and not passed either.
    assert [view.name(i) for i in reach(view, [index["qk"]], down=True, stop=products)] == ["qk"]
    above = {view.name(i) for i in reach(view, [index["topk"]], down=False, stop=products)}
    assert above == {"topk", "add2", "add", "mean", "relu", "r", "p", "softmax", "qk"}
