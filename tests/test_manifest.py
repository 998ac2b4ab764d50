"""The typed artifact model (colln.export.manifest), the one precision vocabulary
(colln.export.precisions) and the one pair-or-stack decision (colln.measure.bench.stack_runtimes):
pure functions on hand-made records and files, no export needed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from colln.errors import ExportDirError, UsageError
from colln.export.manifest import Artifact
from colln.export.precisions import GRAPH_PRECISIONS, VOCABULARY, precision, runs_on, stack_precisions
from colln.measure.bench import stack_runtimes
from colln.verify.validate import TOLERANCES

# The records colln's writers put in export.json (colln.export.artifact.write_ort_artifact,
# colln.export.openvino.write_ir), with made-up digests.
ORT_RECORD = {
    "file": "model.ort.onnx",
    "sha256": "a" * 64,
    "source_sha256": "b" * 64,
    "options": {"session.force_spinning_stop": "1"},
}
IR_RECORD = {
    "file": "openvino/model.xml",
    "precision": "int8-bf16",
    "inference_precision": "bf16",
    "options": {"INFERENCE_PRECISION_HINT": "bf16"},
    "sha256": {"openvino/model.xml": "c" * 64, "openvino/model.bin": "d" * 64},
    "accuracy_control": None,
    "float_products": ["/head/MatMul"],
}


@pytest.mark.parametrize(
    ("runtime", "record", "graph"),
    [("onnx", {"file": "model.onnx"}, "fp16"), ("onnxruntime", ORT_RECORD, "int8"), ("openvino", IR_RECORD, "int8")],
)
def test_a_manifest_entry_round_trips_through_an_artifact(runtime: str, record: dict, graph: str, tmp_path: Path) -> None:
    artifact = Artifact.from_record(tmp_path, runtime, record, graph)
    assert artifact.to_record() == record
    assert Artifact.from_record(tmp_path, runtime, artifact.to_record(), graph) == artifact


def test_an_artifact_reads_its_fields_from_the_record(tmp_path: Path) -> None:
    ort = Artifact.from_record(tmp_path, "onnxruntime", ORT_RECORD, "int8")
    # ONNX Runtime runs the graph's precision: the record does not name it.
    assert (ort.precision, ort.path, ort.sha256) == ("int8", tmp_path / "model.ort.onnx", {"model.ort.onnx": "a" * 64})
    assert ort.deploy_files() == {"model.onnx": tmp_path / "model.ort.onnx"}
    ir = Artifact.from_record(tmp_path, "openvino", IR_RECORD, "int8")
    assert (ir.precision, ir.graph, ir.tolerance) == ("int8-bf16", "int8", "int8")
    assert ir.extra["inference_precision"] == "bf16"
    assert ir.deploy_files() == {"model.xml": tmp_path / "openvino/model.xml", "model.bin": tmp_path / "openvino/model.bin"}


def test_an_unknown_precision_is_refused_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ExportDirError, match=r"artifacts\.openvino\.precision is 'fp64', not one of fp32, bf16, int8, int8-bf16"):
        Artifact.from_record(tmp_path, "openvino", {**IR_RECORD, "precision": "fp64"}, "int8")
    # A precision that runs another graph than the export's.
    with pytest.raises(ExportDirError, match=r"precision bf16 runs an fp32 IR, but this is a int8 export"):
        Artifact.from_record(tmp_path, "openvino", {**IR_RECORD, "precision": "bf16"}, "int8")
    with pytest.raises(ExportDirError, match=r"artifacts\.onnxruntime is not a record"):
        Artifact.from_record(tmp_path, "onnxruntime", "model.ort.onnx", "fp32")
    with pytest.raises(UsageError, match=r"precision 'fp64' is not one colln runs: use fp32, fp16, bf16, int8, int8-bf16"):
        precision("fp64")
    with pytest.raises(UsageError, match=r"precision 'bf16' is not one colln runs on tensorrt: use fp32, fp16, int8"):
        precision("bf16", "tensorrt")


def test_an_ir_runs_at_the_precisions_of_its_graph_only(tmp_path: Path) -> None:
    ir = Artifact.from_record(tmp_path, "openvino", IR_RECORD, "int8")
    at_f32 = ir.at("int8")
    assert (at_f32.precision, at_f32.options) == ("int8", {"INFERENCE_PRECISION_HINT": "f32"})
    assert ir.at(None) is ir
    with pytest.raises(UsageError, match="an OpenVINO int8 IR cannot run at bf16: run it at int8 or int8-bf16"):
        ir.at("bf16")
    ort = Artifact.from_record(tmp_path, "onnxruntime", ORT_RECORD, "int8")
    with pytest.raises(UsageError, match="an ONNX Runtime int8 graph cannot run at fp32: run it at int8"):
        ort.at("fp32")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_file_that_does_not_match_its_sha256_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "model.ort.onnx").write_bytes(b"fused graph")
    record = {**ORT_RECORD, "sha256": _sha(b"fused graph"), "source_sha256": _sha(b"graph")}
    artifact = Artifact.from_record(tmp_path, "onnxruntime", record, "fp32")
    assert artifact.verify() is artifact
    (tmp_path / "model.ort.onnx").write_bytes(b"another fused graph")
    with pytest.raises(ExportDirError, match=r"model\.ort\.onnx is missing or does not match export\.json"):
        artifact.verify()
    (tmp_path / "model.ort.onnx").write_bytes(b"fused graph")
    (tmp_path / "model.onnx").write_bytes(b"another graph")
    with pytest.raises(ExportDirError, match=r"model\.onnx changed since model\.ort\.onnx was made from it"):
        artifact.verify()
    # An IR's weights hashed wrong.
    (tmp_path / "openvino").mkdir()
    (tmp_path / "openvino/model.xml").write_text("<net><layers/></net>")
    (tmp_path / "openvino/model.bin").write_bytes(b"weights")
    hashes = {"openvino/model.xml": _sha(b"<net><layers/></net>"), "openvino/model.bin": _sha(b"other weights")}
    ir = Artifact.from_record(tmp_path, "openvino", {**IR_RECORD, "precision": "fp32", "sha256": hashes}, "fp32")
    with pytest.raises(ExportDirError, match=r"model\.bin does not match export\.json"):
        ir.verify()


def test_one_vocabulary_names_every_precision() -> None:
    # colln-export's --precision and --openvino-precision choices, as the CLIs offered them.
    assert GRAPH_PRECISIONS == ("fp32", "fp16", "int8")
    assert runs_on("openvino") == ("fp32", "bf16", "int8", "int8-bf16")
    assert runs_on("tensorrt") == ("fp32", "fp16", "int8")
    # Every precision has its tolerance row; int8-bf16 is judged by int8's.
    assert set(TOLERANCES) == set(VOCABULARY) and TOLERANCES["int8-bf16"] is TOLERANCES["int8"]
    # What each runtime runs in an export's variant stack (the table colln-bench had).
    assert stack_precisions("onnxruntime", "int8") == ("fp32", "int8")
    assert stack_precisions("onnxruntime", "fp32") == ("fp32",)
    assert stack_precisions("openvino", "fp32") == ("fp32", "bf16")
    assert stack_precisions("openvino", "int8") == ("fp32", "bf16", "int8", "int8-bf16")
    with pytest.raises(UsageError, match="not fp16: export fp32 or int8"):
        stack_precisions("openvino", "fp16")


@pytest.mark.parametrize(
    ("precision", "backend", "runtimes", "expected"),
    [
        ("fp32", "onnxruntime", (), None),
        ("fp16", "onnxruntime", (), None),
        ("int8", "onnxruntime", (), ("onnxruntime",)),
        ("int8", "openvino", (), None),
        ("int8", "tensorrt", (), None),
        ("fp32", "onnxruntime", ("onnxruntime", "openvino"), ("onnxruntime", "openvino")),
        ("fp32", "onnxruntime", ("openvino",), ("openvino",)),
    ],
)
def test_one_decision_between_a_pair_and_a_stack(
    precision: str, backend: str, runtimes: tuple[str, ...], expected: tuple[str, ...] | None
) -> None:
    assert stack_runtimes(precision, backend, runtimes) == expected
