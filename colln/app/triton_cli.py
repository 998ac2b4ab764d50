"""``colln-triton EXPORT_DIR REPO``: a model repository entry for a stock Triton (see :mod:`colln.export.triton`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from colln.app.cli import ArgumentParser, entry_point, positive_int
from colln.export.triton import PLATFORMS, write_model_repository


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
        help="Triton backend: model.onnx, openvino/model.xml + .bin (colln-export --openvino) or model.plan "
        "(default onnxruntime)",
    )
    parser.add_argument("--max-batch", type=positive_int, default=32, help="max_batch_size (default 32)")
    parser.add_argument("--name", default=None, help="model name (default: the export directory's name)")
    return parser


def run(
    args: argparse.Namespace,
) -> int:
    print(write_model_repository(args.export_dir, args.repo, backend=args.backend, max_batch=args.max_batch, name=args.name))
    return 0


main = entry_point(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
