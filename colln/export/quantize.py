"""int8 as a property of the graph: static QDQ quantization of the weight products.

:func:`to_int8` rewrites an fp32 graph with ONNX Runtime's quantizer into the explicit-quantization
form that ONNX Runtime and TensorRT both consume (``QuantizeLinear -> DequantizeLinear`` pairs in
front of each quantized product):

- **what is quantized:** every ``MatMul`` / ``Gemm`` whose second input is a weight (qkv, proj,
  fc1, fc2, the head), weights int8 per output channel, activations int8 per tensor; both
  symmetric (zero point 0), as TensorRT requires. Their outputs stay float (no Q/DQ after a
  product): one rounding per product instead of two, ONNX Runtime fuses each into
  ``MatMulIntegerToFloat`` (5-15% faster on deit_small than ``QLinearMatMul`` + ``DequantizeLinear``),
  and inputs-only is TensorRT's recommended Q/DQ placement. The attention products (``q @ k^T``,
  ``softmax @ v``) stay float: quantizing them cost top-1 agreement on digits (98.4-98.9% vs
  99.8%) for no reliable speed gain on ONNX Runtime CPU (benchmarks/README.md).
- **what stays float:** ``Softmax``, ``LayerNormalization`` and the whole selection path
  (:func:`colln.export.precision.fp32_nodes`: the softmax output that feeds the Col-Ln score, the
  score itself and ``TopK``). A quantized ranking flips top-k choices; :func:`selection_crossings`
  checks, on the written graph, that no quantize/dequantize pair touches that path.
- **calibration:** min/max of every quantized activation over the calibration images (static,
  ``MinMax``). Percentile calibration was not better on digits and needs equal-sized batches.

Static rather than dynamic quantization: dynamic ``MatMulInteger`` graphs are ONNX Runtime-only
(TensorRT has no dynamic quantization), and measured only ~5% faster on this CPU.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from colln.errors import CalibrationError
from colln.export.precision import fp32_nodes
from colln.export.spec import INPUT_NAME
from colln.export.walk import OnnxView

QUANTIZED_OPS = ("MatMul", "Gemm")
# Which int8 graph to_int8 writes for the same spec; cached int8 counterparts built by another
# recipe are not reused (2: products' outputs stay float).
RECIPE = 2
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
CALIBRATION_BATCH = 16
# The most top-1 accuracy (a fraction, absolute) an int8 export may lose against the fp32 pruned
# model where labels exist: validation's accuracy gate and NNCF's accuracy control (--max-accuracy-drop).
DEFAULT_MAX_ACCURACY_DROP = 0.005


def weight_products(
    graph: onnx.GraphProto,
) -> list[str]:
    """Names of the ``MatMul`` / ``Gemm`` nodes whose second input is a weight (an initializer)."""
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type in QUANTIZED_OPS and n.input[1] in weights]


def selection_crossings(
    proto: onnx.ModelProto,
) -> list[str]:
    """Where quantization touches the float region: a Softmax, LayerNorm or selection-path node
    (:func:`~colln.export.precision.fp32_nodes`) that reads a ``DequantizeLinear`` output, or a
    Softmax / selection-path node that feeds a ``QuantizeLinear``. A LayerNorm output may be
    quantized as the input of the product after it: the LayerNorm itself still runs in float.
    Empty for a correct int8 graph."""
    view = OnnxView(proto.graph)
    crossings = []
    for i in sorted(fp32_nodes(proto.graph)):
        op, name = view.op_type(i), view.name(i)
        if any(view.op_type(p) in QDQ_OPS for p in view.producers(i)):
            crossings.append(f"{op} {name} reads a dequantized tensor")
        quantized = any(view.op_type(c) in QDQ_OPS for c in view.consumers(i))
        if quantized and op not in view.dialect.norms:
            crossings.append(f"{op} {name} feeds a QuantizeLinear")
    return crossings


def check_calibration(
    images: np.ndarray,
    input_shape: tuple[int, ...],
) -> np.ndarray:
    """``images`` as float32 ``[N, *input_shape]``; CalibrationError when empty, misshapen or not finite."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise CalibrationError(f"the calibration set is empty or not a batch of images (shape {images.shape}): give images")
    if tuple(images.shape[1:]) != tuple(input_shape):
        raise CalibrationError(
            f"calibration images are {tuple(images.shape[1:])} but the model takes {tuple(input_shape)}: "
            "preprocess them with the model's data config (colln.data.preprocess)"
        )
    if not np.isfinite(images).all():
        raise CalibrationError("the calibration images contain NaN or Inf: check the calibration set")
    return images


class _QuantizerWarnings(logging.Filter):
    """Drops the warnings ONNX Runtime's quantizer logs on the root logger for every model
    ("consider pre-processing"); errors still pass."""

    def filter(
        self,
        record: logging.LogRecord,
    ) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in Path(record.pathname).parts


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """For one quantization only; no logger's level or handlers change."""
    root = logging.getLogger()
    quiet = _QuantizerWarnings()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def to_int8(
    proto: onnx.ModelProto,
    calibration: np.ndarray,
) -> onnx.ModelProto:
    """A static QDQ int8 copy of an fp32 ``proto``, calibrated on ``calibration`` ``[N, C, H, W]``
    (preprocessed images; see the module docstring)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    dims = next(i for i in proto.graph.input if i.name == INPUT_NAME).type.tensor_type.shape.dim[1:]
    images = check_calibration(calibration, tuple(d.dim_value for d in dims))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(
                [{INPUT_NAME: images[i : i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    graph = proto.graph
    float_region = [graph.node[i].name for i in sorted(fp32_nodes(graph))]
    with _quiet_quantizer(), tempfile.TemporaryDirectory(prefix="colln-int8-") as tmp:
        out = Path(tmp) / "model.int8.onnx"
        quantize_static(
            proto,
            out,
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_quantize=weight_products(graph),
            nodes_to_exclude=float_region,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
            },
        )
        quantized = onnx.load(str(out))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(proto.metadata_props)
    crossings = selection_crossings(quantized)
    if crossings:
        raise CalibrationError(f"the int8 graph quantizes the token selection ({crossings[0]}); please report this")
    return quantized
