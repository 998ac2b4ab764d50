"""``colln-build EXPORT_DIR``: build the TensorRT engine (``model.plan``) of an existing export.

Same build as ``colln-export ... --trt``; exits 2 with one line saying how to install TensorRT when
neither ``tensorrt`` nor ``tensorrt_rtx`` can be imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from colln.app.cli import ArgumentParser, entry_point
from colln.export.tensorrt import ENGINE_LOG_FILE, build_engine


def add_engine_arguments(
    parser: argparse.ArgumentParser,
) -> None:
    """The engine options shared by colln-build and colln-export --trt."""
    group = parser.add_argument_group("TensorRT engine")
    group.add_argument("--batch-min", type=int, default=1, help="smallest batch the engine accepts (default 1)")
    group.add_argument("--batch-opt", type=int, default=8, help="batch TensorRT tunes for (default 8)")
    group.add_argument("--batch-max", type=int, default=32, help="largest batch the engine accepts (default 32)")
    group.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        metavar="PATH",
        help="tactic timing cache to reuse and update (default ~/.cache/colln/timing-<tensorrt>-<version>.cache)",
    )


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="colln-build",
        description="Build model.plan (+ model.plan.json, model.plan.log) from an export directory's model.onnx "
        "with TensorRT, or TensorRT-RTX when full TensorRT is not installed.",
    )
    parser.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="a directory written by colln-export")
    add_engine_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="print the builder log, and tracebacks on errors")
    return parser


def run(
    args: argparse.Namespace,
) -> int:
    engine = build_engine(
        args.export_dir,
        batch_min=args.batch_min,
        batch_opt=args.batch_opt,
        batch_max=args.batch_max,
        timing_cache=args.timing_cache,
    )
    if args.verbose:
        sys.stderr.write((engine.parent / ENGINE_LOG_FILE).read_text())
    return 0


main = entry_point(build_parser, run)


if __name__ == "__main__":
    raise SystemExit(main())
