"""OpenVINO IR of an export: the same pruned graph for OpenVINO's CPU runtime, at fp32, bf16 or int8.

``openvino/model.xml`` + ``model.bin`` are converted from the validated ``model.onnx``
(``ov.convert_model``; weights kept fp32 on disk, ``compress_to_fp16=False``). The precision is
how OpenVINO runs it:

- **fp32**: the IR compiled with ``INFERENCE_PRECISION_HINT=f32`` (OpenVINO's CPU plugin
  otherwise runs bf16 on CPUs with AVX512-BF16/AMX);
- **bf16**: the same fp32 IR compiled with the hint ``bf16``; what OpenVINO really used is read
  back from the compiled model and recorded;
- **int8**: NNCF post-training quantization of the fp32 graph (``nncf.quantize``, transformer
  model type) on the calibration images, with the token selection kept float
  (:func:`float_scope`), compiled with the hint ``f32`` for what stays float;
- **int8-bf16**: the same int8 IR compiled with the hint ``bf16``: what NNCF left float (the
  selection, attention, LayerNorm) runs bf16 where the CPU has it. It is OpenVINO's own default on
  such CPUs, what a user who passes no config gets.

``export.json`` records the precision asked for (as for bf16, the run precision, not the file's:
an fp32 IR recorded as ``bf16``, an int8 IR as ``int8-bf16``), the hint, and what OpenVINO used.

The IR files and their sha256 are recorded in ``export.json`` (``artifacts["openvino"]``); every
command that opens the IR refuses one that no longer matches (:func:`colln.export.manifest.deployed`).
The precisions, their IRs and hints are colln's one vocabulary (:mod:`colln.export.precisions`).
openvino and nncf are imported on use only (the ``openvino`` extra).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from colln.errors import BackendUnavailableError, CalibrationError, CollnError, ExportDirError, ExportError
from colln.export import walk
from colln.export.manifest import Artifact
from colln.export.precisions import VOCABULARY, runs_on
from colln.export.spec import ONNX_FILE, ExportSpec, file_sha256
from colln.files import display, path_problem

IR_DIR = "openvino"
IR_FILE = f"{IR_DIR}/model.xml"
WEIGHTS_FILE = f"{IR_DIR}/model.bin"
# OpenVINO's element type names -> colln's precision names (what the compiled model reports).
REPORTED = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
EXTRA = "pip install 'colln[openvino]'"
# The CPU plugin's execution-graph layer types that run a matrix product (a MatMul by a constant
# weight is its FullyConnected); its snippets fuse an attention into a "Subgraph" instead.
PRODUCT_LAYERS = frozenset({"FullyConnected", "MatMul", "Convolution", "Deconvolution", "ScaledDotProductAttention", "MHA"})
# A shape carries no values: quantizing the input that a ShapeOf reads changes nothing downstream.
SHAPE_OPS = frozenset({"ShapeOf"})
CALIBRATION_BATCH = 1


def ov_module():
    """The ``openvino`` module; BackendUnavailableError naming the extra when it is not installed."""
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailableError(f"OpenVINO is not installed: {EXTRA}") from exc
    return openvino


def nncf_module():
    """The ``nncf`` module (int8); BackendUnavailableError naming the extra when it is not installed."""
    try:
        import nncf
    except ImportError as exc:
        raise BackendUnavailableError(f"NNCF (OpenVINO's int8 quantizer) is not installed: {EXTRA}") from exc
    return nncf


def selection_path(model) -> set[str]:
    """Friendly names of the nodes on a path from a Softmax to a TopK without a product (the
    Col-Ln score and the selection itself), plus the ``q·kᵀ`` MatMul feeding each such Softmax."""
    view = walk.OpenVinoView(model)
    return {view.name(n) for n in _selection(view)}


def _selection(view: walk.OpenVinoView) -> set[str]:
    path = walk.selection_path(view)
    scoring = [n for n in path if view.op_type(n) == view.dialect.softmax]
    above = walk.reach(view, scoring, down=False, stop=view.dialect.products)
    return path | {n for n in above if view.op_type(n) == "MatMul"}


def attention_products(model) -> set[str]:
    """Friendly names of the products of two activations (``q·kᵀ``, ``softmax·v``; OpenVINO fuses
    the unpruned blocks' attention into ``ScaledDotProductAttention``)."""
    view = walk.OpenVinoView(model)
    return {view.name(n) for n in _attention_products(view)}


def _attention_products(view: walk.OpenVinoView) -> set[str]:
    def weight(node: str) -> bool:
        # A weight reaches a product as a Constant, possibly through a Convert / Reshape / Transpose.
        todo = [node]
        while todo:
            n = todo.pop()
            if view.op_type(n) == "Constant":
                return True
            if view.op_type(n) in ("Convert", "Reshape", "Transpose", "FakeQuantize", "Multiply", "Subtract"):
                todo.extend(view.producers(n))
        return False

    return {
        n
        for n in view.nodes()
        if view.op_type(n) == "ScaledDotProductAttention"
        or (view.op_type(n) == "MatMul" and not any(weight(p) for p in view.producers(n)))
    }


def float_scope(model) -> list[str]:
    """What NNCF must leave float: the selection path (:func:`selection_path`), every LayerNorm
    (``MVN``) and every attention product (:func:`attention_products`). NNCF's transformer default
    otherwise quantizes both inputs of the ``q·kᵀ`` MatMul whose Softmax feeds the score (a
    quantized ranking flips top-k choices), and the attention of the blocks before it, whose
    output the score is computed from (digits_vit keep 0.7: 4 images kept tokens outside the tie
    band, against none with attention float). The weight products are quantized, as in colln's
    ONNX Runtime int8 graph."""
    view = walk.OpenVinoView(model)
    return sorted({view.name(n) for n in _float_scope(view)})


def _float_scope(view: walk.OpenVinoView) -> set[str]:
    norms = {n for n in view.nodes() if view.op_type(n) in view.dialect.norms}
    return _selection(view) | norms | _attention_products(view)


def selection_crossings(model) -> list[str]:
    """Where quantization reaches the float region: a FakeQuantize from which a selection-path node
    or a LayerNorm is reached without passing another product. Empty for a correct int8 IR."""
    view = walk.OpenVinoView(model)
    guarded = {view.name(n) for n in _float_scope(view)}
    found = []
    for fq in (n for n in view.nodes() if view.op_type(n) == "FakeQuantize"):
        below = walk.reach(view, [fq], down=True, stop=view.dialect.products | SHAPE_OPS)[1:]
        hit = next((n for n in below if view.name(n) in guarded), None)
        if hit is not None:
            found.append(f"{view.name(fq)} feeds {view.op_type(hit)} {view.name(hit)}")
    return found


def _quantized_input(view: walk.OpenVinoView, node: str) -> bool:
    """Whether a FakeQuantize feeds ``node`` directly or through weight plumbing (Convert, Reshape, ...)."""
    todo = view.producers(node)
    while todo:
        n = todo.pop()
        if view.op_type(n) == "FakeQuantize":
            return True
        if view.op_type(n) in ("Convert", "Reshape", "Transpose", "Multiply", "Subtract"):
            todo.extend(view.producers(n))
    return False


def float_products(model) -> list[str]:
    """Friendly names of the products outside :func:`float_scope` (the patch embedding's
    Convolution, qkv, proj, fc1, fc2, the head)
    that no FakeQuantize feeds: what stayed float in an int8 IR beyond colln's recipe (none in the
    recipe itself; the ones NNCF's accuracy control reverted)."""
    view = walk.OpenVinoView(model)
    recipe = {view.name(n) for n in _float_scope(view)}
    return sorted(
        view.name(n)
        for n in view.nodes()
        if view.op_type(n) in ("MatMul", "Convolution") and view.name(n) not in recipe and not _quantized_input(view, n)
    )


def quantize(
    model,
    calibration: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    max_accuracy_drop: float | None = None,
):
    """An NNCF int8 copy of the fp32 OpenVINO ``model``, calibrated on ``calibration`` (preprocessed
    images ``[N, C, H, W]``, each its own sample), with :func:`float_scope` left float.

    ``validation`` (labelled images ``(images, labels)``): NNCF's accuracy control
    (``nncf.quantize_with_accuracy_control``) measures the top-1 accuracy of the fp32 and the int8
    model on them and, while int8 loses more than ``max_accuracy_drop`` (a fraction, absolute;
    None: :data:`DEFAULT_MAX_ACCURACY_DROP`), reverts to float the quantized ops NNCF ranks as
    hurting most (by the change of the model's outputs); :func:`float_products` lists them after."""
    from colln.data import top1_accuracy
    from colln.export.quantize import DEFAULT_MAX_ACCURACY_DROP, check_calibration

    nncf = nncf_module()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    shape = tuple(d.get_length() for d in list(model.inputs[0].get_partial_shape())[1:])
    images = check_calibration(calibration, shape)
    samples = [images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
    common = {
        "model_type": nncf.ModelType.TRANSFORMER,
        "subset_size": len(samples),
        "ignored_scope": nncf.IgnoredScope(names=float_scope(model), validate=False),
    }
    # Min/max over the whole set, as colln's ONNX Runtime int8 calibrates: NNCF's default (the mean
    # of per-sample extremes) clips outliers, and digits_vit then kept tokens outside the tie band on
    # 4 of 450 images at the last pruning layer (1 with min/max).
    advanced = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    if validation is None:
        quantized = nncf.quantize(model, nncf.Dataset(samples), advanced_parameters=advanced, **common)
    else:
        val_images, labels = validation
        val_images = check_calibration(val_images, shape)
        items = list(zip(val_images[:, None], np.asarray(labels), strict=True))

        def top1(compiled, data) -> tuple[float, None]:
            # None per item: NNCF then ranks the ops to revert by how much each changes the outputs.
            pairs = list(data)
            scores = np.concatenate([np.asarray(compiled(x)[0]).reshape(1, -1) for x, _ in pairs])
            return top1_accuracy(scores, np.asarray([y for _, y in pairs])), None

        quantized = nncf.quantize_with_accuracy_control(
            model,
            nncf.Dataset(samples),
            nncf.Dataset(items, lambda item: item[0]),
            top1,
            max_drop=DEFAULT_MAX_ACCURACY_DROP if max_accuracy_drop is None else float(max_accuracy_drop),
            drop_type=nncf.DropType.ABSOLUTE,
            advanced_quantization_parameters=advanced,
            **common,
        )
    crossings = selection_crossings(quantized)
    if crossings:
        raise CalibrationError(f"NNCF quantized the token selection ({crossings[0]}); please report this")
    return quantized


def convert(
    onnx_path: Path,
):
    """``ov.convert_model`` of an ONNX file; an op OpenVINO cannot convert is one ExportError naming it."""
    ov = ov_module()
    try:
        return ov.convert_model(str(onnx_path))
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot convert {Path(onnx_path).name}: {_failure(exc)}", stage="openvino") from exc


def _failure(
    exc: Exception,
) -> str:
    """The line of an OpenVINO error that names the op (its messages are multi-line reports)."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if re.search(r"operation|[Oo]p(eration)?s?\b|node", line)]
    return (named[-1] if named else lines[-1] if lines else type(exc).__name__)[:300]


def compile_model(
    model,
    precision: str = "fp32",
    threads: int | None = None,
):
    """``model`` (an ``ov.Model`` or an IR path) compiled for the CPU at ``precision``
    (its hint in :mod:`colln.export.precisions`) on ``threads`` inference threads (None:
    OpenVINO's default). A graph the CPU plugin cannot compile is one ExportError naming the op."""
    ov = ov_module()
    config = {"INFERENCE_PRECISION_HINT": VOCABULARY[precision].openvino_hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        return ov.Core().compile_model(model if not isinstance(model, Path) else str(model), "CPU", config)
    except Exception as exc:
        raise ExportError(f"OpenVINO's CPU plugin cannot compile the graph: {_failure(exc)}", stage="openvino") from exc


def used_precision(
    compiled,
) -> str:
    """The inference precision the compiled model really runs (``fp32``, ``bf16``, ...)."""
    value = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    name = value.split("'")[1] if "'" in value else value
    aliases = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    return REPORTED.get(aliases.get(name, name), name)


def runtime_precisions(
    compiled,
    model,
) -> dict[str, int]:
    """How many matrix products of ``compiled``'s execution graph (``get_runtime_model()``) run at
    each precision, by the CPU plugin's ``runtimePrecision`` (e.g. ``{"bf16": 40, "f32": 3, "u8":
    36}``; an int8 product reads ``u8`` or ``i8``). ``model``: the ``ov.Model`` compiled, whose
    products name a fused attention ``Subgraph`` (which counts once)."""
    products = {n.get_friendly_name() for n in model.get_ordered_ops() if n.get_type_name() in walk.DIALECTS["openvino"].products}
    counts: Counter[str] = Counter()
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        kind = info["layerType"].astype(str)
        fused = set(info["originalLayersNames"].astype(str).split(","))
        if kind in PRODUCT_LAYERS or (kind == "Subgraph" and fused & products):
            counts[info["runtimePrecision"].astype(str)] += 1
    return dict(sorted(counts.items()))


def write_ir(
    export_dir: Path,
    precision: str = "fp32",
    calibration: np.ndarray | None = None,
    source: Path | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    max_accuracy_drop: float | None = None,
) -> ExportSpec:
    """Write ``export_dir/openvino/model.xml`` + ``.bin`` at ``precision`` (one OpenVINO runs,
    :mod:`colln.export.precisions`) from ``source`` (default: the export's ``model.onnx``; int8
    and int8-bf16 need an fp32 graph of the same pruned model and ``calibration`` images; with
    labelled ``validation`` images, NNCF's accuracy control holds the top-1 drop within
    ``max_accuracy_drop``, see :func:`quantize`), compile it once, and record the files, their
    sha256, the compile options, the precision OpenVINO used, the runtime precisions of its matrix
    products (:func:`runtime_precisions`) and, for int8, the accuracy control
    and what stayed float in ``export.json`` (an :class:`colln.export.manifest.Artifact`).
    Returns the updated spec."""
    ov = ov_module()
    export_dir = Path(export_dir)
    spec = ExportSpec.read(export_dir)
    if precision not in runs_on("openvino"):
        raise ExportError(f"OpenVINO precision {precision!r} is not supported: use {', '.join(runs_on('openvino'))}")
    graph = VOCABULARY[precision].graph
    model = convert(source or export_dir / ONNX_FILE)
    if graph == "int8":
        if calibration is None:
            raise CalibrationError("an OpenVINO int8 IR needs calibration images")
        model = quantize(model, calibration, validation, max_accuracy_drop)
    (export_dir / IR_DIR).mkdir(exist_ok=True)
    try:
        ov.save_model(model, str(export_dir / IR_FILE), compress_to_fp16=False)
    except RuntimeError as exc:
        raise _write_failure(exc, export_dir / IR_DIR, source or export_dir / ONNX_FILE) from exc
    saved = ov.Core().read_model(str(export_dir / IR_FILE))
    compiled = compile_model(saved, precision)
    extra = {"inference_precision": used_precision(compiled), "runtime_precisions": runtime_precisions(compiled, saved)}
    if graph == "int8":
        from colln.export.quantize import DEFAULT_MAX_ACCURACY_DROP

        drop = DEFAULT_MAX_ACCURACY_DROP if max_accuracy_drop is None else float(max_accuracy_drop)
        extra["accuracy_control"] = (
            {"method": "nncf.quantize_with_accuracy_control", "metric": "top-1", "images": len(validation[1]), "max_drop": drop}
            if validation is not None
            else None
        )
        extra["float_products"] = float_products(model)
    artifact = Artifact(
        directory=export_dir,
        runtime="openvino",
        file=IR_FILE,
        precision=precision,
        options={"INFERENCE_PRECISION_HINT": VOCABULARY[precision].openvino_hint},
        sha256={name: file_sha256(export_dir / name) for name in (IR_FILE, WEIGHTS_FILE)},
        extra=extra,
    )
    spec = replace(spec, artifacts={**spec.artifacts, "openvino": artifact.to_record()})
    spec.write(export_dir)
    return spec


def _write_failure(
    exc: RuntimeError,
    directory: Path,
    source: Path,
) -> CollnError:
    """What ``ov.save_model`` failing means: its C++ stream error (``basic_ios::clear: iostream
    error``) carries no errno, so a disk with less room left than the source graph's size (about
    the IR's) is taken as full."""
    if shutil.disk_usage(directory).free < Path(source).stat().st_size:
        return path_problem(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), directory, "")
    return ExportError(
        f"OpenVINO could not write its IR to {display(directory)} ({_failure(exc)}): check that the disk has room and "
        "the directory is writable, or choose another --out",
        stage="openvino",
    )


def is_quantized(
    xml: Path,
) -> bool:
    """Whether an IR holds NNCF's quantization (FakeQuantize layers), read from the XML alone."""
    from xml.etree import ElementTree

    try:
        layers = ElementTree.parse(xml).getroot().iter("layer")
        return any(layer.get("type") == "FakeQuantize" for layer in layers)
    except ElementTree.ParseError as exc:
        raise ExportDirError(f"{xml} is not a readable OpenVINO IR ({exc}): re-run colln-export with --openvino --force") from exc
