"""fp16 as a property of the graph: a strongly typed fp16 ONNX model.

TensorRT 11 (and TensorRT-RTX) builds strongly typed networks: there is no fp16 builder flag, each
tensor runs in the type the graph gives it. :func:`to_fp16` rewrites an fp32 graph so that weights
and activations are fp16, except where pruning needs fp32:

- ``Softmax`` (attention probabilities are summed over queries for the Col-Ln score),
- ``LayerNormalization`` (variance in fp16 loses too much),
- ``TopK`` and the score subgraph feeding it (head mean, ``A^n``, column sums, the [CLS] row, the
  rescue mask): the nodes on a path from a Softmax to a TopK that passes no matrix product.

Casts are inserted where the two regions meet. The input ``images`` and the output ``logits`` stay
float32, so callers feed and read the same arrays as for the fp32 export.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from colln.export.walk import OnnxView, selection_path

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def fp32_nodes(
    graph: onnx.GraphProto,
) -> set[int]:
    """Indices of the nodes that stay fp32: every Softmax, LayerNorm and TopK, plus the selection
    path between them (:func:`colln.export.walk.selection_path`)."""
    view = OnnxView(graph)
    d = view.dialect
    keep = {d.softmax, d.topk, *d.norms}
    return selection_path(view) | {i for i in view.nodes() if view.op_type(i) in keep}


def to_fp16(
    proto: onnx.ModelProto,
) -> onnx.ModelProto:
    """A strongly typed fp16 copy of an fp32 ``proto`` (see the module docstring)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = proto.graph
    elem = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *graph.input, *graph.output)}
    elem.update({t.name: t.data_type for t in graph.initializer})
    keep32 = fp32_nodes(graph)
    view = OnnxView(graph)

    def want(i: int) -> int:
        node = graph.node[i]
        if node.op_type == "Constant" and all(j in keep32 for j in view.consumers(i)):
            return FLOAT
        return FLOAT if i in keep32 else HALF

    # dtype each float tensor has after conversion; casts are made once per (tensor, type).
    dtype = {t.name: FLOAT for t in graph.initializer if t.data_type == FLOAT}
    dtype.update({v.name: FLOAT for v in graph.input if v.type.tensor_type.elem_type == FLOAT})
    initializers = {t.name: t for t in graph.initializer}
    new_inits: list[onnx.TensorProto] = []
    casts: dict[tuple[str, int], str] = {}
    out_nodes: list[onnx.NodeProto] = []

    def as_type(name: str, to: int) -> str:
        if dtype.get(name, to) == to:
            return name
        key = (name, to)
        if key not in casts:
            suffix = "fp16" if to == HALF else "fp32"
            casts[key] = f"{name}__{suffix}"
            if name in initializers and to == HALF:
                half = numpy_helper.to_array(initializers[name]).astype(np.float16)
                new_inits.append(numpy_helper.from_array(half, casts[key]))
            else:
                out_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to, name=f"{casts[key]}_cast"))
            dtype[casts[key]] = to
        return casts[key]

    for i, node in enumerate(graph.node):
        to = want(i)
        node = _retype_attributes(node, to)
        inputs = [as_type(x, to) if x and elem.get(x) == FLOAT else x for x in node.input]
        del node.input[:]
        node.input.extend(inputs)
        for o in node.output:
            if elem.get(o) == FLOAT:
                dtype[o] = to
        out_nodes.append(node)
    finals = []
    for out in graph.output:
        if elem.get(out.name) == FLOAT and dtype.get(out.name) == HALF:
            finals.append(_rename_output(out_nodes, out.name))
    used = {x for n in out_nodes for x in n.input}
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    del result.graph.node[:]
    result.graph.node.extend(out_nodes + finals)
    del result.graph.initializer[:]
    result.graph.initializer.extend([t for t in graph.initializer if t.name in used] + [t for t in new_inits if t.name in used])
    del result.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(result)


def _retype_attributes(
    node: onnx.NodeProto,
    to: int,
) -> onnx.NodeProto:
    """A copy of ``node`` whose float32 type-carrying attributes (Cast ``to``, constant values) say ``to``."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    for a in out.attribute:
        if a.name == "to" and a.i == FLOAT:
            a.i = to
        elif a.name == "value" and a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT and to == HALF:
            a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
    return out


def _rename_output(
    nodes: list[onnx.NodeProto],
    name: str,
) -> onnx.NodeProto:
    """Make the fp16 producer of graph output ``name`` write ``name__fp16`` and return the Cast
    that turns it back into float32 ``name``."""
    half = f"{name}__fp16"
    for node in nodes:
        for j, o in enumerate(node.output):
            if o == name:
                node.output[j] = half
        for j, x in enumerate(node.input):
            if x == name:
                node.input[j] = half
    return helper.make_node("Cast", [half], [name], to=FLOAT, name=f"{name}_to_float32")
