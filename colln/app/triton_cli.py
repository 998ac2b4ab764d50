"""``colln-triton EXPORT_DIR REPO``: a model repository entry for a stock Triton (see :mod:`colln.export.triton`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from colln.app.cli import ArgumentParser, entry_point, positive_int
from colln.export.triton import DEVICES, PLATFORMS, write_model_repository


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="colln-triton", description="Write a Triton model repository entry for a colln export.")
    parser.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="a colln export directory (colln-export output)")
    parser.add_argument("repo", type=Path, metavar="REPO", help="Triton model repository; the model goes to REPO/NAME")
    parser.add_argument(
        "--backend",
        "--triton-backend",
        dest="backend",
        choices=sorted(PLATFORMS),
        default="onnxruntime",
        help="Triton backend: model.ort.onnx (model.onnx on cuda or for older exports), openvino/model.xml + .bin "
        "(colln-export --openvino) or model.plan (default onnxruntime)",
    )
    parser.add_argument("--max-batch", type=positive_int, default=32, help="max_batch_size (default 32)")
    parser.add_argument("--name", default=None, help="model name (default: the export directory's name)")
    parser.add_argument(
        "--instances",
        type=positive_int,
        default=None,
        help="instance_group count; onnxruntime on the CPU: that many one-thread instances, what colln-bench --threads N "
        "times (default: onnxruntime on the CPU one per CPU here, colln-bench's default threads; otherwise 1)",
    )
    parser.add_argument(
        "--device",
        choices=sorted({d for devices in DEVICES.values() for d in devices}),
        default=None,
        help="where the backend runs: onnxruntime cpu (model.ort.onnx, default) or cuda (the plain model.onnx); "
        "tensorrt cuda, openvino cpu",
    )
    return parser


def run(
    args: argparse.Namespace,
) -> int:
    entry = write_model_repository(
        args.export_dir,
        args.repo,
        backend=args.backend,
        max_batch=args.max_batch,
        name=args.name,
        instances=args.instances,
        device=args.device,
    )
    print(entry)
    return 0


main = entry_point(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
