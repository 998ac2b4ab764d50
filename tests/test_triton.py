"""colln-triton / write_model_repository: the layout and config.pbtxt Triton loads, for every
backend (python included: colln-serve's entries), with one set of checks and errors.

Triton's own schema is the reference: config.pbtxt is parsed with protobuf's strict text format
into tritonclient's generated ModelConfig (unknown fields or bad enum values fail), and the dims
are compared with what ONNX Runtime reads from the same model.onnx. PyTriton's bundled Triton has
the python backend only (no onnxruntime/tensorrt backend), so loading into a real server is
tested for the python-backend config that colln-serve writes (test_serve.py); the onnxruntime
entry's file is run here the way its config tells Triton's onnxruntime backend to run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from colln.app.triton_cli import main
from colln.errors import CollnError, ExportDirError, TritonRepoError, UsageError
from colln.export.triton import write_model_repository
from colln.infer.runners import SplitBatchOnnxrtRunner, open_runner
from colln.serve.server import serve

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = "intra_op_thread_count"


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
    # The deployable artifact export.json lists for ONNX Runtime (the attention fusion written out).
    listed = json.loads((digits_export / "export.json").read_text())["artifacts"]["onnxruntime"]["file"]
    assert listed == "model.ort.onnx"
    shipped = (model_dir / "1" / "model.onnx").read_bytes()
    assert shipped == (digits_export / listed).read_bytes() and shipped != (digits_export / "model.onnx").read_bytes()
    config = parse_config(model_dir / "config.pbtxt")
    assert config.name == model_dir.name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    in_dims, out_dims = onnx_dims(digits_export / "model.onnx")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("images", model_config_pb2.TYPE_FP32, in_dims)]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("logits", model_config_pb2.TYPE_FP32, out_dims)]
    assert config.HasField("dynamic_batching")
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 10_000
    # The listed artifact is ONNX Runtime's CPU flavour: CPU instances of one intra-op thread each,
    # by default one per CPU (colln-bench's default threads, one batch slice each).
    cpus = len(os.sched_getaffinity(0))
    assert [(g.count, g.kind) for g in config.instance_group] == [(cpus, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert {k: v.string_value for k, v in config.parameters.items()} == {ONE_THREAD: "1"}


def test_onnxruntime_instances_run_the_listed_artifact_as_colln_bench_slices(digits_export: Path, tmp_path: Path) -> None:
    """--instances 2: two CPU instances of one intra-op thread, requests batched and run side by
    side. Run here as the config tells Triton's onnxruntime backend (a plain session per instance
    with the config's thread count, nothing else), two requests at once: the logits are colln's
    runner's on the same images (its SplitBatchOnnxrtRunner on 2 threads runs one slice per thread),
    and the portable model.onnx's."""
    assert main([str(digits_export), str(tmp_path / "repo"), "--instances", "2", "--name", "digits"]) == 0
    model_dir = tmp_path / "repo" / "digits"
    config = parse_config(model_dir / "config.pbtxt")
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert config.parameters[ONE_THREAD].string_value == "1" and config.HasField("dynamic_batching")

    def instance() -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(config.parameters[ONE_THREAD].string_value)
        return ort.InferenceSession(str(model_dir / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"])

    from serving_helpers import digit_images

    images = digit_images(8)
    requests = [images[:4], images[4:]]
    instances = [instance() for _ in range(config.instance_group[0].count)]
    with ThreadPoolExecutor(len(instances)) as pool:
        served = list(pool.map(lambda pair: pair[0].run(["logits"], {"images": pair[1]})[0], zip(instances, requests)))
    runner = open_runner(digits_export, threads=2)
    assert isinstance(runner, SplitBatchOnnxrtRunner)
    with runner:
        reference = runner.infer({"images": images})["logits"]
    np.testing.assert_allclose(np.concatenate(served), reference, rtol=1e-5, atol=1e-5)
    plain = ort.InferenceSession(str(digits_export / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(np.concatenate(served), plain.run(["logits"], {"images": images})[0], rtol=1e-4, atol=1e-5)


def test_onnxruntime_entry_of_an_export_without_the_artifact_ships_model_onnx(digits_export: Path, tmp_path: Path) -> None:
    older = shutil.copytree(digits_export, tmp_path / "older")
    spec = json.loads((older / "export.json").read_text())
    (older / spec["artifacts"].pop("onnxruntime")["file"]).unlink()
    (older / "export.json").write_text(json.dumps(spec))

    model_dir = write_model_repository(older, tmp_path / "repo", instances=3)

    assert (model_dir / "1" / "model.onnx").read_bytes() == (older / "model.onnx").read_bytes()
    config = parse_config(model_dir / "config.pbtxt")
    assert [(g.count, g.kind) for g in config.instance_group] == [(3, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert config.parameters[ONE_THREAD].string_value == "1"


def test_onnxruntime_artifact_is_checked_like_every_artifact_open(digits_export: Path, tmp_path: Path) -> None:
    export = shutil.copytree(digits_export, tmp_path / "export")
    artifact = export / "model.ort.onnx"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    with pytest.raises(ExportDirError, match=r"model\.ort\.onnx is missing or does not match export\.json"):
        write_model_repository(export, tmp_path / "repo")
    artifact.unlink()
    with pytest.raises(ExportDirError, match=r"model\.ort\.onnx is missing or does not match export\.json"):
        write_model_repository(export, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_onnxruntime_artifact_needing_options_triton_cannot_set_is_refused(digits_export: Path, tmp_path: Path) -> None:
    """Triton's onnxruntime backend takes a fixed set of parameters: an artifact recorded with a
    session option beyond force_spinning_stop (moot with one intra-op thread) is not shipped without it."""
    export = shutil.copytree(digits_export, tmp_path / "export")
    spec = json.loads((export / "export.json").read_text())
    assert spec["artifacts"]["onnxruntime"]["options"] == {"session.force_spinning_stop": "1"}
    spec["artifacts"]["onnxruntime"]["options"]["session.intra_op.allow_spinning"] = "0"
    (export / "export.json").write_text(json.dumps(spec))
    with pytest.raises(TritonRepoError, match=r"needs session options session\.intra_op\.allow_spinning, which Triton"):
        write_model_repository(export, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_onnxruntime_on_cuda_ships_the_plain_graph(digits_export: Path, tmp_path: Path) -> None:
    """The GPU image's onnxruntime entry: the portable model.onnx (the fused op is ONNX Runtime's
    CPU flavour), GPU instances, ONNX Runtime's own threads."""
    model_dir = write_model_repository(digits_export, tmp_path / "repo", device="cuda", instances=2)
    assert (model_dir / "1" / "model.onnx").read_bytes() == (digits_export / "model.onnx").read_bytes()
    config = parse_config(model_dir / "config.pbtxt")
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
    assert ONE_THREAD not in config.parameters


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
        write_model_repository(export, tmp_path / "serve", backend="python", runner="tensorrt", max_batch=8)
    serving = write_model_repository(export, tmp_path / "serve", backend="python", runner="tensorrt", max_batch=4)
    config = parse_config(serving / "config.pbtxt")
    assert config.parameters["runner"].string_value == "tensorrt" and config.max_batch_size == 4
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]


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
        ({"instances": 0}, "--instances must be at least 1"),
        ({"backend": "openvino", "device": "cuda"}, "the openvino backend runs on cpu, not 'cuda'"),
        ({"backend": "tensorrt", "device": "cpu"}, "the tensorrt backend runs on cuda, not 'cpu'"),
        ({"runner": "onnxruntime"}, "a runner is for the python backend only"),
        ({"backend": "python"}, "unknown runner None for the python backend"),
        ({"backend": "python", "runner": "tflite"}, "unknown runner 'tflite'"),
        ({"backend": "python", "runner": "onnxruntime", "device": "cuda"}, "give no device"),
    ],
)
def test_bad_arguments_are_refused_before_writing(digits_export: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(CollnError, match=message):
        write_model_repository(digits_export, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_python_backend_config_for_colln_serve(digits_export: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(digits_export, tmp_path, backend="python", runner="onnxruntime", max_batch=8, instances=2)

    config = parse_config(model_dir / "config.pbtxt")
    assert config.backend == "python"
    assert config.parameters["export_dir"].string_value == str(digits_export.resolve())
    assert config.parameters["runner"].string_value == "onnxruntime"
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == ["1", "1/model.py", "config.pbtxt"]
    assert "from colln.serve.triton_model import TritonPythonModel" in (model_dir / "1" / "model.py").read_text()
    # Two exports with one directory name would be one model: refused before anything starts.
    twin = shutil.copytree(digits_export, tmp_path / "other" / digits_export.name)
    with pytest.raises(UsageError, match="both be served as"):
        serve([digits_export, twin])


def test_python_model_imports_without_the_server(digits_export: Path, tmp_path: Path) -> None:
    """The model.py an entry writes, loaded in a fresh interpreter as Triton's python stub loads it
    (by file path): it gets colln's TritonPythonModel and none of colln-serve's server, guard or
    supervisor, nor the runtimes (the runner loads them when an instance starts)."""
    model_dir = write_model_repository(digits_export, tmp_path, backend="python", runner="onnxruntime")
    heavy = [
        "colln.serve.server",
        "colln.serve.supervisor",
        "colln.serve.guard",
        "colln.export.triton",
        "colln.infer.runners",
        "onnx",
        "onnxruntime",
        "polygraphy",
        "pytriton",
        "tritonclient",
        "aiohttp",
    ]
    script = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("model", {str(model_dir / "1" / "model.py")!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps([module.TritonPythonModel.__module__, [m for m in {heavy!r} if m in sys.modules]]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120, check=True)
    assert json.loads(result.stdout) == ["colln.serve.triton_model", []]


@pytest.mark.parametrize(("backend", "missing"), [("tensorrt", "model.plan"), ("openvino", "openvino/model.xml")])
def test_a_missing_file_is_the_same_error_whatever_the_backend(
    digits_export: Path, tmp_path: Path, backend: str, missing: str
) -> None:
    """colln-triton's entry and colln-serve's python entry for the same runtime: one error type and message."""
    with pytest.raises(CollnError) as native:
        write_model_repository(digits_export, tmp_path / "repo", backend=backend)
    with pytest.raises(CollnError) as python:
        write_model_repository(digits_export, tmp_path / "repo", backend="python", runner=backend)
    assert type(native.value) is type(python.value) is TritonRepoError
    assert str(native.value) == str(python.value)
    assert f"has no {missing} for the {backend} backend" in str(python.value)
    assert not (tmp_path / "repo").exists()
