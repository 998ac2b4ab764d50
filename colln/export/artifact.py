"""An export directory as an artifact: load, prune and export a spec into it; read one back and
check that its parts agree."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch import nn

from colln.errors import ExportDirError, UsageError
from colln.export.manifest import Artifact
from colln.export.onnx import export_onnx, read_metadata, save_checked
from colln.export.precisions import GRAPH_PRECISIONS
from colln.export.spec import ONNX_FILE, ORT_FILE, SPEC_FILE, ExportSpec, file_sha256
from colln.models.config import config_name
from colln.models.plan import KeepPlan
from colln.models.rewrite import explicit_attention, get_plan

PLAN_METADATA = "colln.plan"
# The whole ExportSpec the graph was exported with (export.json as written then).
SPEC_METADATA = "colln.spec"
# Which graph export_into writes for the same spec; cached counterparts (colln.export.unpruned)
# written by another revision are rebuilt. 2: timm's non-fused attention, GELU in ONNX Runtime's
# fusable form. 3: model.ort.onnx written beside model.onnx.
GRAPH_REVISION = 3


def default_out_dir(
    spec: ExportSpec,
    root: Path = Path("exports"),
) -> Path:
    return root / f"{spec.model}-{config_name(spec.pruning, spec.precision)}"


@dataclass(frozen=True)
class Exported:
    """A model exported into ``directory`` (which may still be the temp dir)."""

    directory: Path
    spec: ExportSpec
    plan: KeepPlan
    unpruned: nn.Module
    pruned: nn.Module


def check_merge_precision(
    spec: ExportSpec,
) -> None:
    """Refuse a merging configuration (``--merge``, ``--tome``) at any precision but fp32, whatever
    runtime would run it (an OpenVINO int8 IR is quantized from the fp32 graph, and is refused too)."""
    if (spec.pruning.merge or spec.pruning.tome is not None) and spec.precision != "fp32":
        # Measured on digits_vit: fp16 keys flip near-tied nearest-key assignments (token cosine down to 0.97).
        what = "--tome" if spec.pruning.tome is not None else "--merge"
        raise UsageError(f"{what} needs --precision fp32: in {spec.precision}, rounding flips which token absorbs a merged one")


def export_into(
    spec: ExportSpec,
    directory: Path,
    unpruned: nn.Module | None = None,
    calibration: np.ndarray | None = None,
) -> Exported:
    """Load, prune and export ``spec`` into an existing ``directory``: ``model.onnx`` + ``export.json``.

    int8 graphs are calibrated on ``calibration`` (preprocessed images ``[N, C, H, W]``; ``None``:
    the model's default validation images, see :func:`colln.data.validation_images`)."""
    from colln.data import data_config, validation_images

    if spec.precision not in GRAPH_PRECISIONS:
        raise UsageError(f"precision {spec.precision!r} is not supported: use {' or '.join(GRAPH_PRECISIONS)}")
    check_merge_precision(spec)
    unpruned = unpruned if unpruned is not None else spec.load_unpruned()
    pruned = spec.apply(unpruned)
    plan = get_plan(pruned)
    # Artifacts for other runtimes are written (and recorded) after the graph, by their writers.
    spec = replace(spec, plan_record=plan.to_dict(), artifacts={})
    input_size = tuple(data_config(unpruned)["input_size"])
    with explicit_attention(pruned):
        proto = export_onnx(
            pruned,
            Path(directory) / ONNX_FILE,
            input_size=input_size,
            opset=spec.opset,
            metadata={PLAN_METADATA: plan.to_json(), SPEC_METADATA: json.dumps(spec.to_dict())},
            output_names=spec.output_names,
        )
    if spec.precision == "fp16":
        from colln.export.precision import to_fp16

        proto = to_fp16(proto)
        save_checked(proto, Path(directory) / ONNX_FILE)
    elif spec.precision == "int8":
        from colln.export.quantize import to_int8

        if calibration is None:
            calibration = validation_images(spec.model, unpruned).images
        proto = to_int8(proto, calibration)
        save_checked(proto, Path(directory) / ONNX_FILE)
    spec = replace(spec, artifacts=write_ort_artifact(proto, Path(directory), spec.precision))
    spec.write(directory)
    return Exported(directory=Path(directory), spec=spec, plan=plan, unpruned=unpruned, pruned=pruned)


# What colln's ONNX Runtime CPU session sets beyond the defaults (colln.infer.runners.onnxruntime_runner).
ORT_SESSION_OPTIONS = {"session.force_spinning_stop": "1"}


def write_ort_artifact(
    proto,
    directory: Path,
    precision: str = "fp32",
) -> dict:
    """``artifacts`` of a fresh export of a ``precision`` graph: ``onnx`` (model.onnx, the portable
    graph) and, when the fused graph fits in one file, ``onnxruntime`` (model.ort.onnx, with the
    attention fusion colln applies for ONNX Runtime on CPU written out, its sha256 and session
    options). Neither record names the precision: both run the graph's."""
    from colln.export.onnx import MAX_SINGLE_FILE
    from colln.export.ort_graph import for_onnxruntime

    artifacts = {"onnx": Artifact(directory, "onnx", ONNX_FILE, precision).to_record()}
    fused, _ = for_onnxruntime(proto)
    if fused.ByteSize() <= MAX_SINGLE_FILE:
        save_checked(fused, directory / ORT_FILE)
        artifacts["onnxruntime"] = Artifact(
            directory,
            "onnxruntime",
            ORT_FILE,
            precision,
            options=dict(ORT_SESSION_OPTIONS),
            sha256={ORT_FILE: file_sha256(directory / ORT_FILE)},
            source_sha256=file_sha256(directory / ONNX_FILE),
        ).to_record()
    return artifacts


def read_export(
    directory: Path,
) -> ExportSpec:
    """The spec of an export directory, after checking that ``model.onnx`` is there and that every
    field of ``export.json`` the graph determines (model, input size, every prune setting, the keep
    plan, precision, opset, the weights' hash) is what the graph records: a graph replaced, or an
    export.json edited behind colln's back, is a damaged export. A weights file's path may change
    (the file was moved; its hash is checked when the reference is rebuilt)."""
    spec = ExportSpec.read(directory)
    onnx_path = Path(directory) / ONNX_FILE
    if not onnx_path.is_file():
        raise ExportDirError(f"{directory} has no {ONNX_FILE}: re-run colln-export with --force")
    try:
        metadata = read_metadata(onnx_path)
    except Exception as exc:
        raise ExportDirError(
            f"{onnx_path} is not a readable ONNX model ({type(exc).__name__}): re-run colln-export with --force"
        ) from exc
    recorded = metadata.get(PLAN_METADATA)
    if recorded is None or json.loads(recorded) != json.loads(json.dumps(spec.plan_record)):
        raise ExportDirError(f"{onnx_path} does not carry the keep plan of its export.json: re-run colln-export with --force")
    if SPEC_METADATA in metadata:
        differ = _spec_differences(json.loads(metadata[SPEC_METADATA]), json.loads(json.dumps(spec.to_dict())))
        if differ:
            raise ExportDirError(
                f"{Path(directory) / SPEC_FILE} does not match its {ONNX_FILE} ({', '.join(differ)} differ): "
                "it was edited; re-run colln-export with --force"
            )
    return spec


def _spec_differences(
    graph: dict,
    written: dict,
) -> list[str]:
    """The fields (``pruning.keep``, ``precision``, ...) in which ``written`` (export.json) differs
    from ``graph`` (the spec the graph was exported with); a weights file's path is not compared.
    Only the fields the graph records count (a field added to colln later has its default there)."""
    differ = []
    for key in sorted(graph):
        if key == "weights" and graph.get("weights_sha256") is not None:
            continue
        if key == "artifacts":  # written after the graph, by their writers; each is checked by its own sha256
            continue
        if key == "pruning" and isinstance(graph.get(key), dict) and isinstance(written.get(key), dict):
            differ += [f"pruning.{k}" for k in sorted(graph[key]) if graph[key][k] != written[key].get(k)]
        elif graph.get(key) != written.get(key):
            differ.append(key)
    return differ
