"""ONNX export of a (pruned) timm ViT with a dynamic batch axis and constant-K TopK.

Opset 18 by default: TensorRT 10/11's ONNX parser handles it, and it is below opset 23, where the
exporter would emit the ``Attention`` op that TensorRT 10 cannot parse.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from colln.errors import ExportError
from colln.export.spec import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME

MIN_OPSET, MAX_OPSET = 17, 22
MAX_SINGLE_FILE = 1_900_000_000  # protobuf's 2 GB limit, with room for the graph itself


def export_onnx(
    model: nn.Module,
    path: Path,
    input_size: tuple[int, int, int],
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Export ``model`` to ``path`` (one file when it fits under 2 GB) and run the full checker.

    ``input_size`` is ``(C, H, W)``; the batch axis is dynamic. ``metadata`` lands in the model's
    ``metadata_props`` (colln stores the keep plan there).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is unsupported: use {MIN_OPSET}..{MAX_OPSET} (23+ emits Attention, which TensorRT 10 cannot parse)")
    path = Path(path)
    example = torch.randn(2, *input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    first_arg = next(iter(_forward_params(model)))
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model.eval(),
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={first_arg: {0: batch}},
                external_data=False,
                optimize=True,
            )
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types
        raise ExportError(f"torch.onnx.export failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); rerun with --verbose") from exc
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    large = proto.ByteSize() > MAX_SINGLE_FILE
    onnx.save_model(proto, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the export: {str(exc).splitlines()[0][:200]}") from exc
    return proto


def _forward_params(
    model: nn.Module,
) -> list[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)


def topk_constants(
    proto: onnx.ModelProto,
) -> list[int]:
    """K of every TopK node in graph order; raises if any K is not a constant."""
    consts: dict[str, int] = {}
    for init in proto.graph.initializer:
        if init.dims in ([], [1]):
            consts[init.name] = int(numpy_helper.to_array(init).reshape(-1)[0])
    for node in proto.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and list(value.dims) in ([], [1]):
                consts[node.output[0]] = int(numpy_helper.to_array(value).reshape(-1)[0])
    ks = []
    for node in proto.graph.node:
        if node.op_type == "TopK":
            if node.input[1] not in consts:
                raise ExportError(f"TopK {node.name} has a computed K: the graph would not have static shapes")
            ks.append(consts[node.input[1]])
    return ks


def read_metadata(
    path: Path,
) -> dict[str, str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
