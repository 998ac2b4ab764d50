"""``colln-serve``: serve colln exports on a real Triton Inference Server (PyTriton's bundled one).

colln runs the Triton 2.51 binary PyTriton bundles, with its python backend, on private loopback
ports behind a guard and a supervisor (:mod:`colln.serve.supervisor`, :mod:`colln.serve.guard`);
each export becomes a python-backend entry (written by :func:`colln.export.triton.write_model_repository`,
the writer of every Triton entry) whose instances (:class:`colln.serve.triton_model.TritonPythonModel`)
run the export through :func:`colln.infer.runners.open_runner`. A python-backend model, rather than
PyTriton's own inference proxy, because it answers each request of a dynamic batch on its own (a
NaN image fails its request, not its batch-mates) and its errors carry our message only: PyTriton's
proxy sends Python tracebacks, with server paths, to the client.

The guard answers malformed requests with 4xx before Triton sees them; the python model rejects
NaN/Inf (400) and turns a failed inference into a 500 that names the exception type only (the
traceback goes to the server log).
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path

from colln.errors import BackendUnavailableError, CollnError, ServeError, UsageError
from colln.export.triton import PLATFORMS, PYTHON, model_name, write_model_repository

# The python backend runs any runtime's colln runner.
SERVE_BACKENDS = tuple(sorted(PLATFORMS))


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
) -> signal.Signals | None:
    """Serve ``exports`` (one Triton model each, named after its directory) until SIGINT/SIGTERM/SIGHUP,
    behind the guard (:mod:`colln.serve.guard`) and under the supervisor (restart on any failure);
    returns the signal that stopped it.

    ``repository`` instead: serve an existing model repository (``colln-triton``'s) as it is, with
    ``tritonserver`` (a stock Triton binary with its backends: the GPU image)."""
    if (repository is None) == (not exports):
        raise UsageError("give export directories, or --repository (not both)")
    names = [model_name(e) for e in exports]
    for name in names:
        if names.count(name) > 1:
            raise UsageError(f"two exports would both be served as {name!r}: give exports with different directory names")
    if repository is None:
        try:
            import pytriton  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailableError("PyTriton is not installed: pip install 'colln[serve]'") from exc
    from colln.serve.supervisor import log, remove_stale_shm, run

    remove_stale_shm()
    with tempfile.TemporaryDirectory(prefix="colln-serve-") as workdir:
        if repository is None:
            repo = Path(workdir) / "models"
            repo.mkdir()
            for export, name in zip(exports, names, strict=True):
                write_model_repository(export, repo, PYTHON, max_batch, name, instances, runner=backend)
            for export in exports:
                preflight(export, backend)
        else:
            repo = Path(repository).resolve()
            names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
            if not names:
                raise ServeError(f"{repository} holds no model (no NAME/config.pbtxt): write one with colln-triton")
        check_ports(host, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
        stopped_by = asyncio.run(run(repo, Path(workdir), names, host, http_port, grpc_port, metrics_port, tritonserver))
    log("stopped")
    return stopped_by


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
