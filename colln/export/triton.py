"""Triton model repositories for colln exports.

``write_model_repository`` lays an export out the way a stock Triton Inference Server loads it::

    <repo>/<name>/config.pbtxt      platform, max batch, dynamic batching, instance group, tensors
    <repo>/<name>/1/model.onnx      onnxruntime backend (platform onnxruntime_onnx), or
    <repo>/<name>/1/model.plan      TensorRT backend (platform tensorrt_plan), or
    <repo>/<name>/1/model.xml+.bin  OpenVINO backend (backend openvino; the export's checked IR)

``colln-triton EXPORT_DIR REPO`` (:mod:`colln.app.triton_cli`) and ``colln-export --triton-repo REPO`` call it. The same
``model_config`` text also describes colln's python-backend model (``colln.serve.server``).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from colln.errors import TritonRepoError, UsageError
from colln.export.artifact import read_export
from colln.export.openvino import IR_FILE, WEIGHTS_FILE, read_ir
from colln.export.spec import INPUT_NAME, ONNX_FILE
from colln.export.tensorrt import ENGINE_FILE, read_engine_metadata
from colln.files import atomic_dir

# backend choice -> (Triton platform, model file in the version directory, default instance kind)
PLATFORMS = {
    # KIND_AUTO: on a GPU when the server has one (CUDA execution provider), else on CPU.
    "onnxruntime": ("onnxruntime_onnx", ONNX_FILE, "KIND_AUTO"),
    "tensorrt": ("tensorrt_plan", ENGINE_FILE, "KIND_GPU"),
    # Triton's OpenVINO backend has no platform name: the config names the backend, and the
    # backend loads 1/model.xml with 1/model.bin beside it.
    "openvino": ("openvino", IR_FILE, "KIND_CPU"),
}
# Small enough not to add visible latency at low load, long enough to merge concurrent requests.
QUEUE_DELAY_US = 500
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")
# Triton's model names are directory names in the repository: no separators, never "." or "..".
_NAME_RULE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


# ONNX TensorProto element type -> Triton config data type (what colln graphs can hold).
TRITON_TYPES = {
    1: "TYPE_FP32",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    2: "TYPE_UINT8",
}
CONFIG_FILE = "config.pbtxt"


def tensor_specs(
    export_dir: Path,
) -> tuple[list[tuple[str, str, tuple[int, ...]]], list[tuple[str, str, tuple[int, ...]]]]:
    """``(name, Triton data type, per-sample dims)`` of the ``images`` input and of every output
    (``logits``, or more for exports with several), read from ``model.onnx``'s graph."""
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

    def spec(
        value,
    ) -> tuple[str, str, tuple[int, ...]]:
        shape = value.type.tensor_type.shape.dim[1:]
        if any(not d.HasField("dim_value") for d in shape):
            raise TritonRepoError(
                f"{path}: {value.name} must have static dims after the batch axis; re-export with a fixed --img-size"
            )
        kind = TRITON_TYPES.get(value.type.tensor_type.elem_type)
        if kind is None:
            raise TritonRepoError(f"{path}: {value.name} has an element type Triton configs here cannot describe")
        return value.name, kind, tuple(d.dim_value for d in shape)

    inputs = [v for v in graph.input if v.name == INPUT_NAME]
    if not inputs or not graph.output:
        raise TritonRepoError(f"{path} has no {INPUT_NAME!r} input or no output: re-export it with colln-export")
    return [spec(inputs[0])], [spec(v) for v in graph.output]


def model_name(
    export_dir: Path,
) -> str:
    """A Triton model name (letters, digits, ``._-``) from the export directory's name."""
    name = _NAME_OK.sub("_", Path(export_dir).resolve().name).strip("._-")
    return name or "colln"


def model_dir(
    repo: Path,
    name: str,
) -> Path:
    """``<repo>/<name>``, after checking that ``name`` is a Triton model name and that the path
    cannot resolve outside ``repo`` (a name such as ``.``, ``..`` or ``a/b``, or a symlink, is refused)."""
    if not _NAME_RULE.fullmatch(name):
        raise UsageError(
            f"Triton model name {name!r} must start with a letter, digit or '_' and hold only letters, digits, "
            "'.', '_' and '-' (200 at most): pick another --name"
        )
    root = Path(repo).resolve()
    target = root / name
    if target.is_symlink() or target.resolve().parent != root:
        raise TritonRepoError(f"{target} is a symlink: a model entry is written inside {root} only; remove the link")
    return target


def model_config(
    name: str,
    engine: tuple[str, str],
    inputs: Sequence[tuple[str, str, Sequence[int]]],
    outputs: Sequence[tuple[str, str, Sequence[int]]],
    max_batch: int,
    kind: str,
    instances: int = 1,
    parameters: dict[str, str] | None = None,
) -> str:
    """``config.pbtxt`` text (Triton's ModelConfig protobuf, text format). ``engine`` is
    ``("platform", "onnxruntime_onnx")`` or ``("backend", "python")``; tensors as :func:`tensor_specs` gives them."""
    if max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {max_batch}")
    if instances < 1:
        raise UsageError(f"--instances must be at least 1, got {instances}")

    def tensors(
        specs: Sequence[tuple[str, str, Sequence[int]]],
    ) -> str:
        return ",\n".join(
            f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}' for n, t, dims in specs
        )

    lines = [
        f'name: "{name}"',
        f'{engine[0]}: "{engine[1]}"',
        f"max_batch_size: {max_batch}",
        f"input [\n{tensors(inputs)}\n]",
        f"output [\n{tensors(outputs)}\n]",
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
    spec = read_export(export_dir)
    platform, model_file, kind = PLATFORMS[backend]
    source = export_dir / model_file
    if not source.is_file():
        hint = {"tensorrt": f"build it with colln-build {export_dir}", "openvino": "re-run colln-export with --openvino"}
        raise TritonRepoError(
            f"{export_dir} has no {model_file} for the {backend} backend: {hint.get(backend, 're-run colln-export')}"
        )
    if backend == "tensorrt":
        check_plan_for_triton(export_dir, max_batch)
    files = [model_file]
    if backend == "openvino":
        read_ir(export_dir, spec)  # an IR that no longer matches export.json is not deployed
        files.append(WEIGHTS_FILE)
    name = name or model_name(export_dir)
    target = model_dir(repo, name)
    inputs, outputs = tensor_specs(export_dir)
    engine = ("backend", platform) if backend == "openvino" else ("platform", platform)
    config = model_config(name, engine, inputs, outputs, max_batch, kind)
    with atomic_dir(target, force=True, marker=CONFIG_FILE, option="REPO") as tmp:
        (tmp / CONFIG_FILE).write_text(config)
        (tmp / "1").mkdir()
        for file in files:
            shutil.copy2(export_dir / file, tmp / "1" / Path(file).name)
    return target


def check_plan_batches(
    export_dir: Path,
    max_batch: int,
) -> dict:
    """``model.plan.json``, after checking its profile covers batches 1..max_batch (Triton's dynamic
    batcher sends any size in that range). A clear error otherwise."""
    meta = read_engine_metadata(export_dir)
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
