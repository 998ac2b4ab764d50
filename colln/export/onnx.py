"""ONNX export of a (pruned) timm ViT with a dynamic batch axis and constant-K TopK.

Opset 18 by default: TensorRT 10/11's ONNX parser handles it, and it is below opset 23, where the
exporter would emit the ``Attention`` op that TensorRT 10 cannot parse.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from colln.errors import ExportError
from colln.export.spec import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME
from colln.files import interrupts_held

MIN_OPSET, MAX_OPSET = 17, 22
MAX_SINGLE_FILE = 1_900_000_000  # protobuf's 2 GB limit, with room for the graph itself
# The buffers that bound the clamps of timm's Gemma4ClippableLinear (Gemma 4's E2B/E4B towers).
CLAMP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def export_onnx(
    model: nn.Module,
    path: Path,
    input_size: tuple[int, int, int],
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> onnx.ModelProto:
    """Export ``model`` to ``path`` (one file when it fits under 2 GB) and run the full checker.

    ``input_size`` is ``(C, H, W)``; the batch axis is dynamic. ``metadata`` lands in the model's
    ``metadata_props`` (colln stores the keep plan there). ``output_names`` name the model's outputs
    in order (``tokens``, ``indices`` for a tokens model).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset} is unsupported: use {MIN_OPSET}..{MAX_OPSET} (23+ emits Attention, which TensorRT 10 cannot parse)"
        )
    path = Path(path)
    example = torch.randn(2, *input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    first_arg = next(iter(_forward_params(model)))
    log = io.StringIO()
    try:
        # interrupts_held: torch.export runs Python callbacks from C++, where an interrupt can abort the process.
        with (
            interrupts_held(),
            constant_clamp_bounds(model),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model.eval(),
                (example,),
                input_names=[INPUT_NAME],
                output_names=list(output_names),
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={first_arg: {0: batch}},
                external_data=False,
                optimize=True,
            )
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); rerun with --verbose"
        ) from exc
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        # The exporter builds at its own opset and converts down; when that fails it keeps its own.
        raise ExportError(
            f"the ONNX exporter produced opset {written}, not the requested {opset} (its version conversion failed): "
            f"export with --opset {written}"
        )
    gelu_for_fusion(proto)
    for key, value in (metadata or {}).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    save_checked(proto, path)
    return proto


@contextlib.contextmanager
def constant_clamp_bounds(
    model: nn.Module,
) -> Iterator[None]:
    """Inside the context, the clamp bounds of every clipping ``Gemma4ClippableLinear`` are Python
    floats (their buffers' values) instead of 0-dim buffers; the buffers are back afterwards.

    ``torch.clamp`` by tensor bounds is exported as ``Max(Min(x, hi), lo)``, which onnxscript's
    optimizer (0.7) fuses into a ``Clip`` whose bound initializers it names after ``x``. Gemma 4's
    q, k and v projections clamp the same input, so the second fusion's initializers replace the
    first's, whose ``Clip`` is left reading tensors that no longer exist (onnx.checker: "Nodes in a
    graph must be topologically sorted"). Float bounds are exported as one ``Clip`` directly."""
    try:
        from timm.models.gemma4_vit import Gemma4ClippableLinear
    except ImportError:  # a timm before 1.0.31 has no Gemma 4
        clipping = []
    else:
        clipping = [m for m in model.modules() if isinstance(m, Gemma4ClippableLinear) and m.use_clipped]
    saved = [dict(m._buffers) for m in clipping]
    for m in clipping:
        for name in CLAMP_BOUNDS:
            value = float(m._buffers.pop(name))
            setattr(m, name, value)
    try:
        yield
    finally:
        for m, buffers in zip(clipping, saved, strict=True):
            for name in CLAMP_BOUNDS:
                delattr(m, name)
            m._buffers.clear()
            m._buffers.update(buffers)


def save_checked(
    proto: onnx.ModelProto,
    path: Path,
) -> None:
    """Save ``proto`` to ``path`` (one file when it fits under 2 GB) and run the full checker."""
    path = Path(path)
    large = proto.ByteSize() > MAX_SINGLE_FILE
    onnx.save_model(proto, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the export: {str(exc).splitlines()[0][:200]}") from exc


def gelu_for_fusion(
    proto: onnx.ModelProto,
) -> int:
    """Rewrite the exporter's exact GELU, ``x * (0.5 * (1 + erf(x / sqrt(2))))``, in place as
    ``(x * (1 + erf(x / sqrt(2)))) * 0.5``, and return how many were rewritten.

    The same numbers (scaling by 0.5 is exact) in the form ONNX Runtime fuses into one ``Gelu``
    node, with the bias ``Add`` before it, into ``BiasGelu``: the exporter's form is not matched and
    runs as five element-wise ops (deit_small int8, batch 8, 2 threads: 4-5% of the time). Plain
    ONNX ops either way, so TensorRT parses both."""
    graph = proto.graph
    g = GraphIndex(graph)

    def other(node: onnx.NodeProto, name: str) -> str:
        return node.input[1] if node.input[0] == name else node.input[0]

    def near(name: str, value: float) -> bool:
        return name in g.scalars and abs(float(g.scalars[name]) - value) < 1e-6

    rewritten = 0
    for erf in [n for n in graph.node if n.op_type == "Erf"]:
        div = g.made_by(erf.input[0], "Div")
        add = g.sole_consumer(erf.output[0], "Add")
        half = g.sole_consumer(add.output[0], "Mul") if add is not None else None
        outer = g.sole_consumer(half.output[0], "Mul") if half is not None else None
        if div is None or outer is None:
            continue
        x, one, h = div.input[0], other(add, erf.output[0]), other(half, add.output[0])
        if other(outer, half.output[0]) != x or not (near(div.input[1], 2**0.5) and near(one, 1.0) and near(h, 0.5)):
            continue
        half.input[:] = [x, add.output[0]]
        outer.input[:] = [half.output[0], h]
        rewritten += 1
    return rewritten


def scalar_constants(
    graph: onnx.GraphProto,
) -> dict[str, np.ndarray]:
    """Every one-element constant of ``graph`` (initializer or ``Constant`` node), by tensor name."""
    found = {t.name: numpy_helper.to_array(t).reshape(-1)[0] for t in graph.initializer if list(t.dims) in ([], [1])}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and list(value.dims) in ([], [1]):
                found[node.output[0]] = numpy_helper.to_array(value).reshape(-1)[0]
    return found


class GraphIndex:
    """Producer / consumer / constant lookups over one graph (as it is when indexed)."""

    def __init__(
        self,
        graph: onnx.GraphProto,
    ) -> None:
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.scalars = scalar_constants(graph)
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def sole_consumer(
        self,
        name: str,
        op_type: str,
    ) -> onnx.NodeProto | None:
        """The one node reading ``name`` when it is an ``op_type`` and ``name`` is not a graph output."""
        found = self.consumers.get(name, [])
        if len(found) != 1 or found[0].op_type != op_type or name in self.outputs:
            return None
        return found[0]

    def made_by(
        self,
        name: str,
        op_type: str,
    ) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def ints(
        self,
        name: str,
    ) -> list[int] | None:
        """A constant 1-D int tensor's values (initializer or ``Constant`` node), else None."""
        if name in self.initializers:
            return [int(v) for v in numpy_helper.to_array(self.initializers[name]).reshape(-1)]
        node = self.made_by(name, "Constant")
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node is not None else None
        return [int(v) for v in numpy_helper.to_array(value).reshape(-1)] if value is not None else None


def _forward_params(
    model: nn.Module,
) -> list[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)


def topk_constants(
    proto: onnx.ModelProto,
) -> list[int]:
    """K of every TopK node in graph order; raises if any K is not a constant."""
    return [k for _, k in _topk_nodes(proto)]


def _topk_nodes(
    proto: onnx.ModelProto,
) -> list[tuple[onnx.NodeProto, int]]:
    consts = scalar_constants(proto.graph)
    found = []
    for node in proto.graph.node:
        if node.op_type == "TopK":
            if node.input[1] not in consts:
                raise ExportError(f"TopK {node.name} has a computed K: the graph would not have static shapes")
            found.append((node, int(consts[node.input[1]])))
    return found


def read_metadata(
    path: Path,
) -> dict[str, str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


KEPT_OUTPUT_PREFIX = "colln_kept_L"


def kept_index_nodes(
    proto: onnx.ModelProto,
    pruned_layers: Sequence[tuple[int, int]],
) -> dict[int, list[str]]:
    """The TopK index tensors that select the kept tokens, per pruning layer.

    ``pruned_layers`` is ``(layer, k)`` of every layer that prunes, in order. A layer's selection
    is one TopK of K=k, or two (K=k-r by [CLS], then r by Col-Ln) for the rescue metric; with spatial
    order, the TopK that sorts those picks replaces them. Raises when the graph does not match the plan.
    """
    index_tensors: set[str] = set()
    concat_of: dict[tuple[str, ...], str] = {}
    sorted_by: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type == "TopK" and node.input[0] in index_tensors:
            sorted_by[node.input[0]] = node.output[0]
        elif node.op_type == "TopK":
            index_tensors.add(node.output[1])
        elif node.op_type == "Concat" and all(i in index_tensors for i in node.input):
            index_tensors.add(node.output[0])
            concat_of[tuple(node.input)] = node.output[0]
    queue = iter([(n, k) for n, k in _topk_nodes(proto) if n.input[0] not in index_tensors])
    found: dict[int, list[str]] = {}
    for layer, k in pruned_layers:
        names, total = [], 0
        while total < k:
            node, node_k = next(queue, (None, 0))
            if node is None:
                raise ExportError(f"the graph has fewer TopK nodes than the keep plan (layer {layer}, k={k})")
            names.append(node.output[1])
            total += node_k
        if total != k:
            raise ExportError(f"TopK sizes at layer {layer} sum to {total}, the keep plan says k={k}")
        # Spatial order sorts the picks: the sorted ones are what the next layer's positions refer to.
        picks = names[0] if len(names) == 1 else concat_of.get(tuple(names))
        found[layer] = [sorted_by[picks]] if picks in sorted_by else names
    return found


def with_kept_outputs(
    proto: onnx.ModelProto,
    pruned_layers: Sequence[tuple[int, int]],
) -> onnx.ModelProto:
    """A copy of ``proto`` that also outputs the kept candidate indices of every pruning layer, as
    ``colln_kept_L<layer>_<j>`` (int64 [batch, k_j]; ``j`` counts TopKs within the layer). For
    validation only: it lets ONNX Runtime report which tokens it really kept."""
    debug = onnx.ModelProto()
    debug.CopyFrom(proto)
    for layer, names in kept_index_nodes(proto, pruned_layers).items():
        for j, name in enumerate(names):
            out = f"{KEPT_OUTPUT_PREFIX}{layer}_{j}"
            debug.graph.node.append(onnx.helper.make_node("Identity", [name], [out], name=f"{out}_identity"))
            debug.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.INT64, None))
    return debug
