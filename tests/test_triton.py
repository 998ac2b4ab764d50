"""colln-triton / write_model_repository: the layout and config.pbtxt Triton loads.

Triton's own schema is the reference: config.pbtxt is parsed with protobuf's strict text format
into tritonclient's generated ModelConfig (unknown fields or bad enum values fail), and the dims
are compared with what ONNX Runtime reads from the same model.onnx. PyTriton's bundled Triton has
the python backend only (no onnxruntime/tensorrt backend), so loading into a real server is
tested for the python-backend config that colln-serve writes (test_serve.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from colln.app.triton_cli import main
from colln.errors import CollnError
from colln.export.triton import write_model_repository
from colln.serve.server import write_python_model


def parse_config(
    path: Path,
) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def onnx_dims(
    onnx_path: Path,
) -> tuple[list[int], list[int]]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.get_inputs()[0].shape[1:], session.get_outputs()[0].shape[1:]


def test_onnx_repository_matches_triton_schema_and_export(digits_export: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(digits_export, tmp_path / "repo", max_batch=16)

    assert model_dir == tmp_path / "repo" / digits_export.name
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == (digits_export / "model.onnx").read_bytes()
    config = parse_config(model_dir / "config.pbtxt")
    assert config.name == model_dir.name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    in_dims, out_dims = onnx_dims(digits_export / "model.onnx")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("images", model_config_pb2.TYPE_FP32, in_dims)]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("logits", model_config_pb2.TYPE_FP32, out_dims)]
    assert config.HasField("dynamic_batching")
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 10_000
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_AUTO)]


def test_rewrite_replaces_the_model_and_keeps_neighbours(digits_export: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    other = write_model_repository(digits_export, repo, name="other")
    first = write_model_repository(digits_export, repo, name="digits", max_batch=4)
    (first / "stale.txt").write_text("left from an earlier export")

    again = write_model_repository(digits_export, repo, name="digits", max_batch=8)

    assert again == first
    assert not (first / "stale.txt").exists()
    assert parse_config(first / "config.pbtxt").max_batch_size == 8
    assert parse_config(other / "config.pbtxt").name == "other"
    assert sorted(p.name for p in repo.iterdir()) == ["digits", "other"]


def test_tensorrt_needs_a_plan(digits_export: Path, tmp_path: Path) -> None:
    with pytest.raises(CollnError, match=r"no model\.plan for the tensorrt backend"):
        write_model_repository(digits_export, tmp_path / "repo", backend="tensorrt")
    assert not (tmp_path / "repo" / digits_export.name).exists()


def test_tensorrt_plan_must_cover_the_batches_and_be_full_tensorrt(digits_export: Path, tmp_path: Path) -> None:
    """A real plan from this machine's builder (TensorRT-RTX, no GPU needed), batches 1..4."""
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (colln[trt-rtx]) to build a plan without a GPU")
    from colln.export.tensorrt import build_engine

    export = tmp_path / "export"
    shutil.copytree(digits_export, export)
    build_engine(export, batch_min=1, batch_opt=2, batch_max=4)

    with pytest.raises(CollnError, match=r"accepts batches 1\.\.4 but Triton needs 1\.\.8: pass --max-batch 4"):
        write_model_repository(export, tmp_path / "repo", backend="tensorrt", max_batch=8)
    with pytest.raises(CollnError, match="built with TensorRT-RTX"):
        write_model_repository(export, tmp_path / "repo", backend="tensorrt", max_batch=4)
    assert not (tmp_path / "repo").exists()
    # colln-serve runs plans in-process (TensorRT-RTX ones too), but the batches must fit as well.
    with pytest.raises(CollnError, match=r"accepts batches 1\.\.4"):
        write_python_model(export, tmp_path / "serve", runner="tensorrt", max_batch=8)
    config = parse_config(write_python_model(export, tmp_path / "serve", runner="tensorrt", max_batch=4) / "config.pbtxt")
    assert config.parameters["runner"].string_value == "tensorrt" and config.max_batch_size == 4


@pytest.mark.gpu
def test_tensorrt_repository_uses_the_plan(digits_export: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="needs full TensorRT (colln[trt]) on an NVIDIA GPU")
    from colln.export.tensorrt import build_engine

    export = tmp_path / "export"
    shutil.copytree(digits_export, export)
    build_engine(export, batch_min=1, batch_opt=8, batch_max=16)
    model_dir = write_model_repository(export, tmp_path / "repo", backend="tensorrt", max_batch=16)

    config = parse_config(model_dir / "config.pbtxt")
    assert (config.platform, config.max_batch_size) == ("tensorrt_plan", 16)
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert (model_dir / "1" / "model.plan").read_bytes() == (export / "model.plan").read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "tflite"}, "unknown Triton backend"),
        ({"max_batch": 0}, "at least 1"),
        ({"name": "a b/c"}, "must start with a letter, digit or '_' and hold only"),
    ],
)
def test_bad_arguments_are_refused_before_writing(digits_export: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(CollnError, match=message):
        write_model_repository(digits_export, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_python_backend_config_for_colln_serve(digits_export: Path, tmp_path: Path) -> None:
    model_dir = write_python_model(digits_export, tmp_path, runner="onnxruntime", max_batch=8, instances=2)

    config = parse_config(model_dir / "config.pbtxt")
    assert config.backend == "python"
    assert config.parameters["export_dir"].string_value == str(digits_export.resolve())
    assert config.parameters["runner"].string_value == "onnxruntime"
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert "from colln.serve.server import TritonPythonModel" in (model_dir / "1" / "model.py").read_text()
    with pytest.raises(CollnError, match="both be served as"):
        write_python_model(digits_export, tmp_path)


def test_cli_writes_and_reports_errors(digits_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(digits_export), str(tmp_path / "repo"), "--name", "digits", "--max-batch", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "repo" / "digits")
    assert parse_config(tmp_path / "repo" / "digits" / "config.pbtxt").max_batch_size == 2

    not_an_export = tmp_path / "empty"
    not_an_export.mkdir()
    assert main([str(not_an_export), str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("colln: error: export-dir:") and "run colln-export first" in err
    assert "Traceback" not in err


def test_missing_or_corrupt_onnx_is_a_clear_error(digits_export: Path, tmp_path: Path) -> None:
    broken = tmp_path / "no-onnx"
    shutil.copytree(digits_export, broken)
    (broken / "model.onnx").unlink()
    with pytest.raises(CollnError, match=r"no model\.onnx"):
        write_model_repository(broken, tmp_path / "repo")
    (broken / "model.onnx").write_bytes(b"\xff\x00 not a protobuf")
    with pytest.raises(CollnError, match="not a readable ONNX model"):
        write_model_repository(broken, tmp_path / "repo")
