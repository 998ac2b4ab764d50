"""``colln-serve``: serve colln exports on a real Triton Inference Server (PyTriton's bundled one).

colln runs the Triton 2.51 binary PyTriton bundles, with its python backend, on private loopback
ports behind a guard and a supervisor (:mod:`colln.serve.supervisor`, :mod:`colln.serve.guard`);
each export becomes a python-backend model (``config.pbtxt`` from
:func:`colln.export.triton.model_config`) whose instances run the export through
:func:`colln.infer.runners.open_runner`. A python-backend model, rather than PyTriton's own
inference proxy, because it answers each request of a dynamic batch on its own (a NaN image fails
its request, not its batch-mates) and its errors carry our message only: PyTriton's proxy sends
Python tracebacks, with server paths, to the client.

The guard answers malformed requests with 4xx before Triton sees them; :class:`TritonPythonModel`
rejects NaN/Inf (400) and turns a failed inference into a 500 that names the exception type only
(the traceback goes to the server log).
"""

from __future__ import annotations

import asyncio
import json
import os
import sysconfig
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from colln.errors import BackendUnavailableError, CollnError, ServeError, UsageError
from colln.export.artifact import read_export
from colln.export.spec import INPUT_NAME
from colln.export.triton import CONFIG_FILE, PLATFORMS, check_plan_batches, model_config, model_dir, model_name, tensor_specs

SERVE_BACKENDS = ("onnxruntime", "openvino", "tensorrt")
# The python backend imports this file as <repo>/<name>/1/model.py.
MODEL_PY = "from colln.serve.server import TritonPythonModel  # noqa: F401  (colln's python-backend model)\n"


class TritonPythonModel:
    """Triton python-backend model: one colln runner per instance, one response per request."""

    def initialize(
        self,
        args: dict,
    ) -> None:
        import triton_python_backend_utils as pb_utils

        from colln.infer.runners import open_runner

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = config["parameters"]
        # Every output the config declares (read from the ONNX graph when it was written), with its type.
        self.outputs = [o["name"] for o in config["output"]]
        self.runner = open_runner(Path(params["export_dir"]["string_value"]), backend=params["runner"]["string_value"])
        self.runner.activate()

    def execute(
        self,
        requests: list,
    ) -> list:
        pb = self.pb
        responses: list = [None] * len(requests)
        accepted: list[tuple[int, np.ndarray]] = []
        for i, request in enumerate(requests):
            images = pb.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            if np.isfinite(images).all():
                accepted.append((i, images))
            else:
                responses[i] = self._error(
                    f"{INPUT_NAME} contains NaN or Inf: send finite pixel values", pb.TritonError.INVALID_ARG
                )
        if accepted:
            for i, response in self._infer(accepted):
                responses[i] = response
        return responses

    def _infer(
        self,
        accepted: list[tuple[int, np.ndarray]],
    ) -> list:
        """Run the merged batch once; split every output back into one response per request."""
        pb = self.pb
        batch = np.concatenate([images for _, images in accepted])
        try:
            results = self.runner.infer({INPUT_NAME: batch})
            outputs = {name: results[name] for name in self.outputs}
            for name, rows in outputs.items():
                if rows.shape[0] != batch.shape[0]:
                    raise ValueError(f"runner returned {rows.shape[0]} rows of {name} for a batch of {batch.shape[0]}")
        except Exception as exc:  # noqa: BLE001 - any failure becomes an error response, never a crash
            pb.Logger.log_error(f"colln: inference failed:\n{traceback.format_exc()}")
            # The type name only: exception text can hold server paths.
            error = self._error(
                f"inference failed ({type(exc).__name__}); the server log has the details", pb.TritonError.INTERNAL
            )
            return [(i, error) for i, _ in accepted]
        out, start = [], 0
        for i, images in accepted:
            tensors = [pb.Tensor(name, np.ascontiguousarray(rows[start : start + len(images)])) for name, rows in outputs.items()]
            out.append((i, pb.InferenceResponse(output_tensors=tensors)))
            start += len(images)
        return out

    def _error(
        self,
        message: str,
        code: int,
    ) -> object:
        return self.pb.InferenceResponse(error=self.pb.TritonError(message, code))

    def finalize(self) -> None:
        self.runner.deactivate()


def write_python_model(
    export_dir: Path,
    repo: Path,
    runner: str = "onnxruntime",
    max_batch: int = 32,
    instances: int = 1,
    name: str | None = None,
) -> Path:
    """``<repo>/<name>``: a python-backend model that serves ``export_dir`` through ``runner``."""
    export_dir = Path(export_dir).resolve()
    if runner not in SERVE_BACKENDS:
        raise UsageError(f"unknown --backend {runner!r}: choose one of {', '.join(SERVE_BACKENDS)}")
    read_export(export_dir)
    model_file = PLATFORMS[runner][1]
    if not (export_dir / model_file).is_file():
        raise BackendUnavailableError(
            f"{export_dir} has no {model_file} for --backend {runner}: build it or use --backend onnxruntime"
        )
    if runner == "tensorrt":
        check_plan_batches(export_dir, max_batch)
    if runner == "openvino":
        from colln.export.openvino import read_ir

        read_ir(export_dir)
    name = name or model_name(export_dir)
    inputs, outputs = tensor_specs(export_dir)
    target = model_dir(repo, name)
    if target.exists():
        raise UsageError(f"two exports would both be served as {name!r}: give exports with different directory names")
    (target / "1").mkdir(parents=True)
    kind = "KIND_GPU" if runner == "tensorrt" else "KIND_CPU"
    parameters = {"export_dir": str(export_dir), "runner": runner}
    config = model_config(name, ("backend", "python"), inputs, outputs, max_batch, kind, instances, parameters)
    (target / CONFIG_FILE).write_text(config)
    (target / "1" / "model.py").write_text(MODEL_PY)
    return target


def stub_environment() -> None:
    """Let Triton's python-backend stub load this interpreter's libpython, not another one on the
    system (a mismatched one fails inside the stdlib). The stub inherits our environment."""
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])


def preflight(
    export_dir: Path,
    backend: str,
) -> None:
    """Load the runner here first: a model that cannot load inside Triton leaves the server up but
    never ready (PyTriton then waits minutes), while here it is one clear error."""
    from colln.infer.runners import open_runner

    try:
        runner = open_runner(Path(export_dir), backend=backend)
        runner.activate()
        runner.deactivate()
    except CollnError:
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServeError(
            f"{export_dir}: the {backend} runner cannot load it ({detail}); re-export it or pick another --backend"
        ) from exc


def serve(
    exports: Sequence[Path],
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    backend: str = "onnxruntime",
    max_batch: int = 32,
    instances: int = 1,
    repository: Path | None = None,
    tritonserver: str | None = None,
) -> None:
    """Serve ``exports`` (one Triton model each, named after its directory) until SIGINT/SIGTERM/SIGHUP,
    behind the guard (:mod:`colln.serve.guard`) and under the supervisor (restart on any failure).

    ``repository`` instead: serve an existing model repository (``colln-triton``'s) as it is, with
    ``tritonserver`` (a stock Triton binary with its backends: the GPU image)."""
    if (repository is None) == (not exports):
        raise UsageError("give export directories, or --repository (not both)")
    if repository is None:
        try:
            import pytriton  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailableError("PyTriton is not installed: pip install 'colln[serve]'") from exc
    from colln.serve.supervisor import log, remove_stale_shm, run

    stub_environment()
    remove_stale_shm()
    with tempfile.TemporaryDirectory(prefix="colln-serve-") as workdir:
        if repository is None:
            repo = Path(workdir) / "models"
            repo.mkdir()
            names = [write_python_model(e, repo, backend, max_batch, instances).name for e in exports]
            for export in exports:
                preflight(export, backend)
        else:
            repo = Path(repository).resolve()
            names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
            if not names:
                raise ServeError(f"{repository} holds no model (no NAME/config.pbtxt): write one with colln-triton")
        check_ports(host, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
        asyncio.run(run(repo, Path(workdir), names, host, http_port, grpc_port, metrics_port, tritonserver))
    log("stopped")


def check_ports(
    host: str,
    ports: dict[str, int],
) -> None:
    """Each port valid, distinct and free now: a port in use is one line at once, not a Triton time-out."""
    from colln.serve.supervisor import port_free

    if len(set(ports.values())) < len(ports):
        raise UsageError(f"{', '.join(ports)} must differ, got {', '.join(map(str, ports.values()))}")
    for option, port in ports.items():
        if not 0 < port < 65536:
            raise UsageError(f"{option} must be a port in 1..65535, got {port}")
        if not port_free(host, port):
            raise ServeError(f"port {port} is in use ({option}): stop what listens there or pass another {option}")
