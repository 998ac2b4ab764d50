"""``colln-serve EXPORT_DIR...``: serve colln exports on Triton (see :mod:`colln.serve.server`)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from colln.app.cli import ArgumentParser, entry_point, interrupted, positive_int
from colln.report.export_report import REPORT_JSON
from colln.serve.server import SERVE_BACKENDS, serve


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="colln-serve", description="Serve colln exports on Triton Inference Server (PyTriton).")
    parser.add_argument(
        "exports",
        type=Path,
        nargs="*",
        metavar="EXPORT_DIR",
        help="export directories; each is a model named after its directory",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="serve this Triton model repository (colln-triton's) instead of export directories",
    )
    parser.add_argument(
        "--tritonserver",
        default=None,
        help="tritonserver binary with its backends, for --repository (default: PyTriton's bundled Triton 2.51)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address for HTTP, gRPC and metrics (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default 8000)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics port (default 8002)")
    parser.add_argument(
        "--backend", choices=SERVE_BACKENDS, default="onnxruntime", help="runner inside the server (default onnxruntime)"
    )
    parser.add_argument(
        "--max-batch", type=positive_int, default=32, help="largest batch a request or a dynamic batch may have (default 32)"
    )
    parser.add_argument("--instances", type=positive_int, default=1, help="model instances (processes) per export (default 1)")
    return parser


def failed_validation(
    export_dir: Path,
    backend: str,
) -> str | None:
    """The warning for an export whose report says it failed the validation of the runtime served
    (colln-export --no-fail writes such exports), else ``None``."""
    try:
        report = json.loads((Path(export_dir) / REPORT_JSON).read_text())
        checked = (report.get("openvino") or {}).get("validation") if backend == "openvino" else report.get("validation")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(checked, dict) or checked.get("passed") is not False:
        return None
    return (
        f"warning: {export_dir} failed its {checked.get('backend', backend)} validation against PyTorch "
        f"({Path(export_dir) / REPORT_JSON}): serving it anyway"
    )


def run(
    args: argparse.Namespace,
) -> int:
    for export in args.exports:
        warning = failed_validation(export, args.backend)
        if warning:
            print(f"colln-serve: {warning}", file=sys.stderr, flush=True)
    stopped_by = serve(
        args.exports,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        backend=args.backend,
        max_batch=args.max_batch,
        instances=args.instances,
        repository=args.repository,
        tritonserver=args.tritonserver,
    )
    # Ctrl-C is an interrupt like any command's (130); SIGTERM and SIGHUP (docker stop, a service
    # manager) are how a server is asked to stop: done, 0.
    return interrupted() if stopped_by == signal.SIGINT else 0


main = entry_point(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
