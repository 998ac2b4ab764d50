"""Triton model repository entries for colln exports: one writer for every backend.

``write_model_repository`` lays an export out the way a Triton Inference Server loads it::

    <repo>/<name>/config.pbtxt      engine, max batch, dynamic batching, instance group, tensors, parameters
    <repo>/<name>/1/model.onnx      onnxruntime backend (platform onnxruntime_onnx): on the CPU the
                                    export's listed ONNX Runtime artifact (model.ort.onnx), else model.onnx
    <repo>/<name>/1/model.plan      TensorRT backend (platform tensorrt_plan), or
    <repo>/<name>/1/model.xml+.bin  OpenVINO backend (backend openvino; the export's checked IR), or
    <repo>/<name>/1/model.py        python backend: colln's model (:mod:`colln.serve.triton_model`),
                                    running the export where it is through a colln runner (colln-serve)

``colln-triton EXPORT_DIR REPO`` (:mod:`colln.app.triton_cli`), ``colln-export --triton-repo REPO`` and
``colln-serve`` (:mod:`colln.serve.server`, python entries) call it: one set of checks and errors
for every backend.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from colln.errors import TritonRepoError, UsageError
from colln.export.artifact import read_export
from colln.export.manifest import deployed, engine_artifact
from colln.export.openvino import IR_FILE
from colln.export.spec import INPUT_NAME, ONNX_FILE, ExportSpec
from colln.export.tensorrt import ENGINE_FILE
from colln.files import atomic_dir

# Triton's own backends for an export: backend -> (the config line that names it, the export's model file).
PLATFORMS = {
    "onnxruntime": (("platform", "onnxruntime_onnx"), ONNX_FILE),
    "tensorrt": (("platform", "tensorrt_plan"), ENGINE_FILE),
    # Triton's OpenVINO backend has no platform name: the config names the backend, and the
    # backend loads 1/model.xml with 1/model.bin beside it.
    "openvino": (("backend", "openvino"), IR_FILE),
}
# The devices each runtime's entry may name, its default first.
DEVICES = {"onnxruntime": ("cpu", "cuda"), "tensorrt": ("cuda",), "openvino": ("cpu",)}
# colln's python-backend model (colln-serve): its instances run the export through a colln runner.
PYTHON = "python"
MODEL_PY = "from colln.serve.triton_model import TritonPythonModel  # noqa: F401  (colln's python-backend model)\n"
# Session options an ONNX Runtime artifact may record that need no carrying into Triton's config
# (its onnxruntime backend takes a fixed set of parameters, no free session config entries):
# force_spinning_stop stops intra-op workers spinning after a run, and an instance with one
# intra-op thread has no workers.
_ORT_OPTIONS_MOOT_ON_ONE_THREAD = frozenset({"session.force_spinning_stop"})
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
    instances: int | None = None,
    device: str | None = None,
    runner: str | None = None,
) -> Path:
    """Write ``<repo>/<name>`` (``config.pbtxt`` + ``1/`` with what ``backend`` loads) for
    ``export_dir`` and return that model directory. ``name`` defaults to the export directory's
    name. An existing ``<repo>/<name>`` is replaced atomically: it is derived from the export.

    ``backend``: one of :data:`PLATFORMS` (the export's files are copied into ``1/``), or
    ``"python"``: colln's python-backend model, whose instances run the export in place through
    ``runner`` (one of :data:`PLATFORMS`; ``1/model.py`` only). Either way the files that runtime
    needs are checked the same way, with the same errors. ``instances``: the instance group's
    count (``None``: one per CPU this process may use for an onnxruntime entry on the CPU, the
    slices colln-bench times at its default thread count on this machine; 1 otherwise).
    ``device``: where the runtime runs (:data:`DEVICES`; default CPU, TensorRT on CUDA).
    An onnxruntime entry on the CPU serves the export's listed ONNX Runtime artifact (checked
    against its sha256; ``model.onnx`` for exports without one) with one intra-op thread per
    instance: ``instances`` single-thread sessions side by side, as colln-bench ``--threads N``
    times N slices of a batch."""
    export_dir = Path(export_dir)
    if backend != PYTHON and backend not in PLATFORMS:
        raise UsageError(f"unknown Triton backend {backend!r}: choose one of {', '.join([*PLATFORMS, PYTHON])}")
    if backend != PYTHON and runner is not None:
        raise UsageError(f"a runner is for the python backend only; the {backend} backend is its own runtime")
    runtime = runner if backend == PYTHON else backend
    if runtime not in PLATFORMS:
        raise UsageError(f"unknown runner {runtime!r} for the python backend: choose one of {', '.join(PLATFORMS)}")
    if backend == PYTHON and device is not None:
        raise UsageError(f"the python backend runs its {runtime} runner on {DEVICES[runtime][0]}: give no device")
    device = device or DEVICES[runtime][0]
    if device not in DEVICES[runtime]:
        raise UsageError(f"the {runtime} backend runs on {' or '.join(DEVICES[runtime])}, not {device!r}")
    spec = read_export(export_dir)
    files = deployed_files(export_dir, spec, runtime, device, max_batch, native=backend != PYTHON)
    name = name or model_name(export_dir)
    target = model_dir(repo, name)
    inputs, outputs = tensor_specs(export_dir)
    kind = "KIND_GPU" if device == "cuda" else "KIND_CPU"
    if instances is None:
        instances = len(os.sched_getaffinity(0)) if (backend, device) == ("onnxruntime", "cpu") else 1
    if backend == PYTHON:
        engine, parameters = ("backend", PYTHON), {"export_dir": str(export_dir.resolve()), "runner": runtime}
    else:
        engine, parameters = PLATFORMS[backend][0], {}
        if backend == "onnxruntime" and device == "cpu":
            parameters["intra_op_thread_count"] = "1"
    config = model_config(name, engine, inputs, outputs, max_batch, kind, instances, parameters)
    with atomic_dir(target, force=True, marker=CONFIG_FILE, option="REPO") as tmp:
        (tmp / CONFIG_FILE).write_text(config)
        (tmp / "1").mkdir()
        if backend == PYTHON:
            (tmp / "1" / "model.py").write_text(MODEL_PY)
        else:
            for dest, source in files.items():
                shutil.copy2(source, tmp / "1" / dest)
    return target


def deployed_files(
    export_dir: Path,
    spec: ExportSpec,
    runtime: str,
    device: str,
    max_batch: int,
    native: bool = True,
) -> dict[str, Path]:
    """``{name in 1/: file of the export}`` that ``runtime`` runs on ``device``, after the checks
    every entry gets: the file is there, a plan covers batches 1..max_batch, the artifact matches
    its record (:func:`colln.export.manifest.deployed`). ``native``: Triton's own backend loads the
    file (not colln's runner inside the python backend), so a plan must also be full TensorRT and
    the ONNX Runtime artifact's session options must be ones the entry can do without."""
    model_file = PLATFORMS[runtime][1]
    if not (export_dir / model_file).is_file():
        hint = {"tensorrt": f"build it with colln-build {export_dir}", "openvino": "re-run colln-export with --openvino"}
        raise TritonRepoError(
            f"{export_dir} has no {model_file} for the {runtime} backend: {hint.get(runtime, 're-run colln-export')}"
        )
    if runtime == "tensorrt":
        if native:
            check_plan_for_triton(export_dir, max_batch)
        else:  # colln's runner loads TensorRT-RTX plans too
            check_plan_batches(export_dir, max_batch)
    # The fused ONNX Runtime graph is its CPU flavour (colln.export.ort_graph): a GPU gets the plain one.
    artifact = deployed(export_dir, runtime, spec, device)
    # colln's runner opens the ONNX Runtime artifact with its options itself; Triton's cannot set them.
    options = set(artifact.options) - _ORT_OPTIONS_MOOT_ON_ONE_THREAD
    if native and artifact.runtime == "onnxruntime" and options:
        raise TritonRepoError(
            f"{artifact.path.name} needs session options {', '.join(sorted(options))}, which Triton's onnxruntime backend "
            "cannot set: serve it with colln-serve"
        )
    return artifact.deploy_files()


def check_plan_batches(
    export_dir: Path,
    max_batch: int,
) -> dict:
    """``model.plan.json``, after checking its profile covers batches 1..max_batch (Triton's dynamic
    batcher sends any size in that range). A clear error otherwise."""
    meta = engine_artifact(export_dir).extra
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
