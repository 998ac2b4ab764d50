"""Triton model repositories for colln exports.

``write_model_repository`` lays an export out the way a stock Triton Inference Server loads it::

    <repo>/<name>/config.pbtxt      platform, max batch, dynamic batching, instance group, tensors
    <repo>/<name>/1/model.onnx      onnxruntime backend (platform onnxruntime_onnx), or
    <repo>/<name>/1/model.plan      TensorRT backend (platform tensorrt_plan)

``colln-triton EXPORT_DIR REPO`` (:mod:`colln.app.triton_cli`) and ``colln-export --triton-repo REPO`` call it. The same
``model_config`` text also describes colln's python-backend model (``colln.runtime.serve``).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from colln.errors import TritonRepoError, UsageError
from colln.export.artifact import read_export
from colln.export.spec import INPUT_NAME, ONNX_FILE
from colln.export.tensorrt import PLAN_FILE, read_plan_metadata
from colln.files import atomic_dir

# backend choice -> (Triton platform, model file in the version directory, default instance kind)
PLATFORMS = {
    # KIND_AUTO: on a GPU when the server has one (CUDA execution provider), else on CPU.
    "onnxruntime": ("onnxruntime_onnx", ONNX_FILE, "KIND_AUTO"),
    "tensorrt": ("tensorrt_plan", PLAN_FILE, "KIND_GPU"),
}
# Small enough not to add visible latency at low load, long enough to merge concurrent requests.
QUEUE_DELAY_US = 500
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


# ONNX element type -> Triton data type of the tensors colln exports.
TRITON_TYPES = {1: "TYPE_FP32", 7: "TYPE_INT64"}


def tensor_dims(
    export_dir: Path,
) -> tuple[tuple[int, ...], list[tuple[str, str, tuple[int, ...]]]]:
    """Per-sample dims of ``images`` and ``(name, Triton type, dims)`` of every output (``logits``,
    or ``tokens`` and ``indices``), batch axis dropped, read from ``model.onnx``."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(export_dir) / ONNX_FILE
    if not path.is_file():
        raise TritonRepoError(f"{export_dir} has no {ONNX_FILE}: run colln-export first")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except (OSError, DecodeError) as exc:
        raise TritonRepoError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}): re-export it with colln-export --force"
        ) from exc

    def dims(
        values,
        name: str,
    ) -> tuple[int, ...]:
        found = [v for v in values if v.name == name]
        if not found:
            raise TritonRepoError(f"{path} has no tensor named {name!r}: re-export it with colln-export")
        shape = found[0].type.tensor_type.shape.dim[1:]
        if any(not d.HasField("dim_value") for d in shape):
            raise TritonRepoError(f"{path}: {name} must have static dims after the batch axis; re-export with a fixed --img-size")
        return tuple(d.dim_value for d in shape)

    outputs = []
    for out in graph.output:
        kind = TRITON_TYPES.get(out.type.tensor_type.elem_type)
        if kind is None:
            raise TritonRepoError(f"{path}: output {out.name} has an element type Triton configs here do not map; re-export it")
        outputs.append((out.name, kind, dims(graph.output, out.name)))
    return dims(graph.input, INPUT_NAME), outputs


def model_name(
    export_dir: Path,
) -> str:
    """A Triton model name (letters, digits, ``._-``) from the export directory's name."""
    name = _NAME_OK.sub("_", Path(export_dir).resolve().name).strip("._-")
    return name or "colln"


def model_config(
    name: str,
    engine: tuple[str, str],
    input_dims: Sequence[int],
    outputs: Sequence[tuple[str, str, Sequence[int]]],
    max_batch: int,
    kind: str,
    instances: int = 1,
    parameters: dict[str, str] | None = None,
) -> str:
    """``config.pbtxt`` text (Triton's ModelConfig protobuf, text format). ``engine`` is
    ``("platform", "onnxruntime_onnx")`` or ``("backend", "python")``; ``outputs`` are ``(name,
    Triton type, dims)`` as :func:`tensor_dims` reads them."""
    if max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {max_batch}")
    if instances < 1:
        raise UsageError(f"--instances must be at least 1, got {instances}")

    def tensor(
        tensor_name: str,
        dims: Sequence[int],
        data_type: str = "TYPE_FP32",
    ) -> str:
        return f'  {{\n    name: "{tensor_name}"\n    data_type: {data_type}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'

    lines = [
        f'name: "{name}"',
        f'{engine[0]}: "{engine[1]}"',
        f"max_batch_size: {max_batch}",
        f"input [\n{tensor(INPUT_NAME, input_dims)}\n]",
        "output [\n" + ",\n".join(tensor(out, dims, kind) for out, kind, dims in outputs) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]",
    ]
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{_escape(value)}" }}\n}}')
    return "\n".join(lines) + "\n"


def _escape(
    text: str,
) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def write_model_repository(
    export_dir: Path,
    repo: Path,
    backend: str = "onnxruntime",
    max_batch: int = 32,
    name: str | None = None,
) -> Path:
    """Write ``<repo>/<name>`` (config.pbtxt + 1/model.onnx or 1/model.plan) for ``export_dir`` and
    return that model directory. ``name`` defaults to the export directory's name. An existing
    ``<repo>/<name>`` is replaced atomically: it is derived from the export, like the plan."""
    export_dir = Path(export_dir)
    if backend not in PLATFORMS:
        raise UsageError(f"unknown Triton backend {backend!r}: choose one of {', '.join(PLATFORMS)}")
    read_export(export_dir)
    platform, model_file, kind = PLATFORMS[backend]
    source = export_dir / model_file
    if not source.is_file():
        hint = f"build it with colln-build {export_dir}" if backend == "tensorrt" else "re-run colln-export"
        raise TritonRepoError(f"{export_dir} has no {model_file} for the {backend} backend: {hint}")
    if backend == "tensorrt":
        check_plan_for_triton(export_dir, max_batch)
    name = name or model_name(export_dir)
    if _NAME_OK.search(name):
        raise UsageError(f"Triton model name {name!r} may only hold letters, digits, '.', '_' and '-'")
    input_dims, outputs = tensor_dims(export_dir)
    config = model_config(name, ("platform", platform), input_dims, outputs, max_batch, kind)
    target = Path(repo) / name
    with atomic_dir(target, force=True) as tmp:
        (tmp / "config.pbtxt").write_text(config)
        (tmp / "1").mkdir()
        shutil.copy2(source, tmp / "1" / model_file)
    return target


def check_plan_batches(
    export_dir: Path,
    max_batch: int,
) -> dict:
    """``model.plan.json``, after checking its profile covers batches 1..max_batch (Triton's dynamic
    batcher sends any size in that range). A clear error otherwise."""
    meta = read_plan_metadata(export_dir)
    low, high = meta["profile"]["min"][0], meta["profile"]["max"][0]
    if low != 1 or high < max_batch:
        raise TritonRepoError(
            f"model.plan accepts batches {low}..{high} but Triton needs 1..{max_batch}: "
            f"pass --max-batch {high if low == 1 else 1} or rebuild with colln-build --batch-min 1 --batch-max {max_batch}"
        )
    return meta


def check_plan_for_triton(
    export_dir: Path,
    max_batch: int,
) -> None:
    """Refuse a plan Triton's tensorrt backend would reject at load time: batches not covered, or
    a TensorRT-RTX plan (the backend links full TensorRT)."""
    if check_plan_batches(export_dir, max_batch)["tensorrt"]["flavour"] != "tensorrt":
        raise TritonRepoError(
            "model.plan was built with TensorRT-RTX; Triton's tensorrt backend loads full TensorRT plans only: "
            "rebuild it with full TensorRT on the serving GPU (the GPU image does this when it starts)"
        )
