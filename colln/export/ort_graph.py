"""The ONNX Runtime flavour of an exported graph: the attention that ONNX Runtime's optimizer leaves
as separate ops, fused into its ``com.microsoft.MultiHeadAttention``.

The exported ``model.onnx`` stays plain ONNX (TensorRT parses it). :func:`for_onnxruntime` is
applied where colln opens an ONNX Runtime CPU session (:func:`colln.infer.runners.session_model`),
so validation, timing and colln-serve all run it; unpruned baselines too, so speedups compare like
with like. colln-triton's onnxruntime entries ship it on the CPU (the export's ``model.ort.onnx``)
and the plain graph on a GPU, where the fused op has not been tried.

Why: ONNX Runtime runs a block's plain attention as a dozen ops (slices of the packed q/k/v,
transposes into heads and back, two products, softmax), and its transposes run on one thread.
The fused op does the same arithmetic with the same MLAS kernels (outputs are bit-identical on
deit_small) in one parallel pass: deit_small, batch 8, 2 threads, pruned int8 1.05-1.15x faster
(benchmarks/README.md). Blocks that prune keep the plain form: their softmax output feeds the
Col-Ln score, which the fused op does not expose.

The match is exact or nothing: the form colln exports (timm's non-fused path, see
:func:`colln.models.rewrite.explicit_attention`), checked op by op, permutation by permutation and
constant by constant; any other form is left as it is (correct, just not fused).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from colln.export.onnx import GraphIndex

MS_DOMAIN = "com.microsoft"
HEAD_SPLIT_PERM = [2, 0, 3, 1, 4]  # [B, N, 3, H, D] -> [3, B, H, N, D]
KEY_TRANSPOSE_PERM = [0, 1, 3, 2]
HEAD_MERGE_PERM = [0, 2, 1, 3]  # [B, H, N, D] -> [B, N, H, D]


@dataclass(frozen=True)
class _Attention:
    """One matched attention: the packed ``[B, N, 3C]`` projection (``packed``, or ``product`` +
    ``bias`` when the bias Add can move into the fused op), heads, scale, the output tensor and
    the node the fused ops replace (``anchor``: the output Reshape)."""

    packed: str
    product: str | None
    bias: str | None
    heads: int
    head_dim: int
    scale: float
    output: str
    anchor: onnx.NodeProto


def for_onnxruntime(
    proto: onnx.ModelProto,
) -> tuple[onnx.ModelProto, int]:
    """A copy of ``proto`` whose non-pruning attentions run as ``MultiHeadAttention``, and how many
    were fused (0: an unchanged copy)."""
    fused = onnx.ModelProto()
    fused.CopyFrom(proto)
    graph = fused.graph
    lookup = GraphIndex(graph)
    matches = [m for m in (_match(lookup, node) for node in graph.node if node.op_type == "Softmax") if m is not None]
    if not matches:
        return fused, 0
    for i, match in enumerate(matches):
        _replace(graph, match, prefix=f"colln_mha{i}")
    _drop_dead_nodes(graph)
    if not any(o.domain == MS_DOMAIN for o in fused.opset_import):
        fused.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused, len(matches)


def _attr(
    node: onnx.NodeProto,
    name: str,
    default: object = None,
) -> object:
    found = next((a for a in node.attribute if a.name == name), None)
    return helper.get_attribute_value(found) if found is not None else default


def _scaled(
    g: GraphIndex,
    name: str,
) -> tuple[str, float]:
    """Walk up through ``Mul`` by a scalar constant: the unscaled tensor and the product of the scalars."""
    scale = 1.0
    while (mul := g.made_by(name, "Mul")) is not None:
        a, b = mul.input
        if b in g.scalars:
            name, scale = a, scale * float(g.scalars[b])
        elif a in g.scalars:
            name, scale = b, scale * float(g.scalars[a])
        else:
            break
    return name, scale


def _head_slice(
    g: GraphIndex,
    name: str,
) -> tuple[str, int] | None:
    """``name`` = ``Squeeze(Slice(heads, [i], [i+1], axes=[0]), [0])``: (``heads``, i)."""
    squeeze = g.made_by(name, "Squeeze")
    if squeeze is None or len(squeeze.input) != 2 or g.ints(squeeze.input[1]) != [0]:
        return None
    sliced = g.made_by(squeeze.input[0], "Slice")
    if sliced is None:
        return None
    start, end = g.ints(sliced.input[1]), g.ints(sliced.input[2])
    axes = g.ints(sliced.input[3]) if len(sliced.input) > 3 else [0]
    steps = g.ints(sliced.input[4]) if len(sliced.input) > 4 else [1]
    if start is None or len(start) != 1 or end != [start[0] + 1] or axes != [0] or steps != [1]:
        return None
    return sliced.input[0], start[0]


def _match(
    g: GraphIndex,
    softmax: onnx.NodeProto,
) -> _Attention | None:
    if _attr(softmax, "axis", -1) not in (-1, 3):
        return None
    av = g.sole_consumer(softmax.output[0], "MatMul")
    qk = g.made_by(softmax.input[0], "MatMul")
    if av is None or qk is None or av.input[0] != softmax.output[0]:
        return None
    merge = g.sole_consumer(av.output[0], "Transpose")
    if merge is None or list(_attr(merge, "perm", [])) != HEAD_MERGE_PERM:
        return None
    anchor = g.sole_consumer(merge.output[0], "Reshape")
    if anchor is None:
        return None
    q, q_scale = _scaled(g, qk.input[0])
    k_t, k_scale = _scaled(g, qk.input[1])
    transpose = g.made_by(k_t, "Transpose")
    if transpose is None or list(_attr(transpose, "perm", [])) != KEY_TRANSPOSE_PERM:
        return None
    k, k_scale_inner = _scaled(g, transpose.input[0])
    slices = [_head_slice(g, name) for name in (q, k, av.input[1])]
    if any(s is None for s in slices) or {s[0] for s in slices} != {slices[0][0]} or [s[1] for s in slices] != [0, 1, 2]:
        return None
    split = g.made_by(slices[0][0], "Transpose")
    if split is None or list(_attr(split, "perm", [])) != HEAD_SPLIT_PERM:
        return None
    unpack = g.made_by(split.input[0], "Reshape")
    shape = g.ints(unpack.input[1]) if unpack is not None else None
    if shape is None or len(shape) != 5 or shape[2] != 3 or min(shape[1:]) <= 0:
        return None
    heads, head_dim = shape[3], shape[4]
    out_shape = g.ints(anchor.input[1])
    if out_shape is None or len(out_shape) != 3 or out_shape[2] != heads * head_dim:
        return None
    packed = unpack.input[0]
    product, bias = None, None
    add = g.made_by(packed, "Add")
    if add is not None and g.sole_consumer(packed, "Reshape") is unpack:
        for p, b in (add.input, add.input[::-1]):
            init = g.initializers.get(b)
            if init is not None and list(init.dims) == [3 * heads * head_dim]:
                product, bias = p, b
                break
    return _Attention(
        packed=packed,
        product=product,
        bias=bias,
        heads=heads,
        head_dim=head_dim,
        scale=q_scale * k_scale * k_scale_inner,
        output=anchor.output[0],
        anchor=anchor,
    )


def _replace(
    graph: onnx.GraphProto,
    match: _Attention,
    prefix: str,
) -> None:
    """Put ``Split`` + ``MultiHeadAttention`` in place of the match's output Reshape (its old
    producers are then dead)."""
    width = match.heads * match.head_dim
    sizes = numpy_helper.from_array(np.array([width] * 3, dtype=np.int64), name=f"{prefix}_sizes")
    graph.initializer.append(sizes)
    source = match.product if match.bias is not None else match.packed
    q, k, v = (f"{prefix}_{part}" for part in "qkv")
    split = helper.make_node("Split", [source, sizes.name], [q, k, v], name=f"{prefix}_split", axis=-1)
    inputs = [q, k, v] + ([match.bias] if match.bias is not None else [])
    attention = helper.make_node(
        "MultiHeadAttention",
        inputs,
        [match.output],
        name=prefix,
        domain=MS_DOMAIN,
        num_heads=match.heads,
        scale=match.scale,
    )
    index = next(i for i, n in enumerate(graph.node) if n is match.anchor)
    match.anchor.output[0] = f"{prefix}_unused"
    graph.node.insert(index, attention)
    graph.node.insert(index, split)


def _drop_dead_nodes(
    graph: onnx.GraphProto,
) -> None:
    """Remove nodes none of whose outputs is used, until none is left; then unused initializers."""
    while True:
        used = {o.name for o in graph.output} | {name for n in graph.node for name in n.input}
        dead = [i for i, n in enumerate(graph.node) if not any(o in used for o in n.output)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    used = {name for n in graph.node for name in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
