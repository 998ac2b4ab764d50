"""``colln-validate EXPORT_DIR --backend tensorrt|onnxruntime|torch``: compare a backend of an
export against its pruned PyTorch reference (same checks and thresholds as colln-export; see
). Exit 0 passed, 1 mismatches, 2 cannot run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from colln.app.cli import ArgumentParser, entry_point
from colln.errors import UsageError
from colln.files import atomic_write
from colln.infer.runners import BACKENDS
from colln.report.render import validation_lines
from colln.verify.validate import validate_export


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="colln-validate", description="Validate an export's backend against its pruned PyTorch reference.")
    p.add_argument("export_dir", type=Path, help="a colln-export output directory")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="backend to check (default onnxruntime)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (onnxruntime and torch; tensorrt is always on the GPU)")
    p.add_argument("--val-images", type=Path, default=None, help="directory of images (default: as colln-export)")
    p.add_argument("--val-limit", type=int, default=None, help="validate on N images spread evenly over the set")
    p.add_argument("--batch", type=int, default=32, help="inference batch size (default 32)")
    p.add_argument("--json", type=Path, default=None, help="also write the validation report to this file")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        metavar="POINTS",
        help="int8 with labelled images: the most top-1 accuracy int8 may lose against the fp32 pruned model, in points "
        "(default 0.5)",
    )
    p.add_argument("--no-fail", action="store_true", help="report mismatches but exit 0")
    return p


def run(
    args: argparse.Namespace,
) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.max_accuracy_drop is not None and not 0 <= args.max_accuracy_drop < 100:
        raise UsageError(f"--max-accuracy-drop is in points, from 0 to 100, got {args.max_accuracy_drop:g}")
    drop = args.max_accuracy_drop / 100 if args.max_accuracy_drop is not None else None
    console = Console(stderr=True)
    with console.status(f"validating {args.backend} against torch"):
        report = validate_export(
            args.export_dir,
            args.backend,
            args.val_images,
            device=args.device,
            batch=args.batch,
            limit=args.val_limit,
            max_accuracy_drop=drop,
        )
    if args.json is not None:
        atomic_write(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
    table = Table(title=f"colln-validate {args.export_dir}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    verdict = "[green]passed[/]" if report.passed else "[red]FAILED[/]"
    table.add_row("validation", f"{verdict}: {report.backend} vs torch on {report.images} images ({report.source})")
    for line in validation_lines(report):
        table.add_row("", line)
    Console().print(table)
    for line in report.warnings:
        console.print(f"[yellow]warning:[/] {line}")
    for line in report.mismatches:
        console.print(f"[red]mismatch:[/] {line}")
    if not args.no_fail:
        report.raise_if_failed(args.json)
    return 0


main = entry_point(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
