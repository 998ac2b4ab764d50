"""``colln-serve``: serve colln exports on a real Triton Inference Server (PyTriton's bundled one).

PyTriton starts Triton 2.51 with its python backend; each export becomes a python-backend model
(``config.pbtxt`` from :func:`colln.runtime.triton.model_config`) whose instances run the export
through :func:`colln.runtime.runners.open_runner`. A python-backend model, rather than PyTriton's own
inference proxy, because it answers each request of a dynamic batch on its own (a NaN image fails
its request, not its batch-mates) and its errors carry our message only: PyTriton's proxy sends
Python tracebacks, with server paths, to the client.

Triton itself rejects wrong shapes, dtypes, batches over ``--max-batch`` and unparsable bodies
(400/500 with its message); :class:`TritonPythonModel` rejects NaN/Inf (400) and turns a failed
inference into a 500 that names the exception type only (the traceback goes to the server log).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import sysconfig
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from colln.errors import BackendUnavailableError, CollnError, ServeError, UsageError
from colln.export.artifact import read_export
from colln.export.spec import INPUT_NAME
from colln.runtime.triton import PLATFORMS, check_plan_batches, model_config, model_name, tensor_dims

SERVE_BACKENDS = ("onnxruntime", "tensorrt")
# The python backend imports this file as <repo>/<name>/1/model.py.
MODEL_PY = "from colln.runtime.serve import TritonPythonModel  # noqa: F401  (colln's python-backend model)\n"


class TritonPythonModel:
    """Triton python-backend model: one colln runner per instance, one response per request."""

    def initialize(
        self,
        args: dict,
    ) -> None:
        import triton_python_backend_utils as pb_utils

        from colln.runtime.runners import open_runner

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = config["parameters"]
        # logits, or tokens and indices: whatever the export's graph outputs (config.pbtxt lists them).
        self.outputs = [out["name"] for out in config["output"]]
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
        """Run the merged batch once; split the outputs back into one response per request."""
        pb = self.pb
        batch = np.concatenate([images for _, images in accepted])
        try:
            results = self.runner.infer({INPUT_NAME: batch})
            outputs = {name: results[name] for name in self.outputs}
            for name, value in outputs.items():
                if value.shape[0] != batch.shape[0]:
                    raise ValueError(f"runner returned {value.shape[0]} rows of {name} for a batch of {batch.shape[0]}")
        except Exception as exc:  # noqa: BLE001 - any failure becomes an error response, never a crash
            pb.Logger.log_error(f"colln: inference failed:\n{traceback.format_exc()}")
            # The type name only: exception text can hold server paths.
            error = self._error(
                f"inference failed ({type(exc).__name__}); the server log has the details", pb.TritonError.INTERNAL
            )
            return [(i, error) for i, _ in accepted]
        out, start = [], 0
        for i, images in accepted:
            rows = {name: v[start : start + len(images)] for name, v in outputs.items()}
            # config.pbtxt declares float outputs FP32 (an fp16 engine may return fp16).
            rows = {name: v.astype(np.float32, copy=False) if v.dtype.kind == "f" else v for name, v in rows.items()}
            tensors = [pb.Tensor(name, np.ascontiguousarray(v)) for name, v in rows.items()]
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
    name = name or model_name(export_dir)
    input_dims, outputs = tensor_dims(export_dir)
    target = Path(repo) / name
    if target.exists():
        raise UsageError(f"two exports would both be served as {name!r}: give exports with different directory names")
    (target / "1").mkdir(parents=True)
    kind = "KIND_GPU" if runner == "tensorrt" else "KIND_CPU"
    parameters = {"export_dir": str(export_dir), "runner": runner}
    config = model_config(name, ("backend", "python"), input_dims, outputs, max_batch, kind, instances, parameters)
    (target / "config.pbtxt").write_text(config)
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
    from colln.runtime.runners import open_runner

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
) -> None:
    """Serve ``exports`` (one Triton model each, named after its directory) until SIGINT/SIGTERM."""
    try:
        from pytriton.client.exceptions import PyTritonClientError
        from pytriton.exceptions import PyTritonError
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise BackendUnavailableError("PyTriton is not installed: pip install 'colln[serve]'") from exc
    for noisy in ("pytriton", "tritonclient"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stub_environment()
    with tempfile.TemporaryDirectory(prefix="colln-serve-") as repo:
        names = [write_python_model(e, Path(repo), backend, max_batch, instances).name for e in exports]
        for export in exports:
            preflight(export, backend)
        config = TritonConfig(
            model_repository=Path(repo),
            http_address=host,
            http_port=http_port,
            grpc_address=host,
            grpc_port=grpc_port,
            metrics_address=host,
            metrics_port=metrics_port,
            strict_readiness=True,
            exit_timeout_secs=10,
            log_verbose=0,
        )
        # SIGTERM (docker stop, kill) takes the same clean path as Ctrl-C: Triton.serve() stops the
        # server and its stubs on KeyboardInterrupt. A signal during startup is held until Triton
        # is up: interrupting its start leaves python-backend stubs running without a server.
        stopping: list[int] = []
        serving: list[bool] = []

        def on_signal(
            signum: int,
            frame: object,
        ) -> None:
            stopping.append(signum)
            if serving:
                raise KeyboardInterrupt

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with Triton(config=config) as triton:
                serving.append(True)
                if not stopping:
                    print(
                        f"colln-serve: serving {', '.join(names)} on http://{host}:{http_port} "
                        f"(grpc {grpc_port}, metrics {metrics_port}); Ctrl-C to stop",
                        file=sys.stderr,
                        flush=True,
                    )
                    triton.serve()
        except KeyboardInterrupt:
            pass  # Triton's context exit has stopped the server
        except (TimeoutError, PyTritonError, PyTritonClientError) as exc:
            raise ServeError(f"Triton did not start ({exc}): its log above says why") from exc
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not stopping:
            # serve() returns without a signal only when Triton or a model stub died.
            raise ServeError("Triton stopped unexpectedly: its log above says why")
    print("colln-serve: stopped", file=sys.stderr, flush=True)
