"""colln-bench: latency and throughput of an export against its unpruned counterpart, the FLOPs
bound of its keep plan, and a regression check of the ratios against those recorded in a file
(``--save-baseline FILE``, then ``--baseline FILE``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from colln.app.cli import ArgumentParser, add_timing_arguments, entry_point, parse_ints, timing_options
from colln.errors import RegressionFileError, UsageError
from colln.files import atomic_write
from colln.infer.runners import BACKENDS
from colln.measure.bench import (
    bench_export,
    check_regression_file,
    check_regressions,
    check_runtimes,
    merge_case,
    recorded_timing,
)
from colln.report.render import print_bench


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="colln-bench",
        description="Time a colln export and its unpruned counterpart, interleaved round by round; "
        "report latency percentiles, throughput, speedup, the FLOPs bound and efficiency = speedup / bound.",
    )
    p.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="a colln-export output directory")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help="runtime to time (default onnxruntime)")
    p.add_argument(
        "--runtimes",
        default=None,
        metavar="LIST",
        help="time the variant stack (unpruned and pruned, fp32 / int8 / bf16 on OpenVINO) on these CPU runtimes in one "
        "interleaved run, e.g. onnxruntime,openvino (an OpenVINO run needs the export's IR: colln-export --openvino)",
    )
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    add_timing_arguments(p)
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="device for the torch and onnxruntime backends (default cpu)"
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the full report as JSON")
    # The option names stay; in the code this file is the regression file ("baseline" is the unpruned model).
    p.add_argument(
        "--baseline",
        dest="regression_file",
        type=Path,
        metavar="FILE",
        help="fail (exit 1) if speedup or efficiency fell below those recorded in FILE (by --save-baseline); timed like "
        "the recorded case where --threads, --rounds, --warmup, --no-split-batches are not given",
    )
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed relative drop below the recorded (default 0.10)")
    p.add_argument(
        "--save-baseline",
        dest="save_regression_file",
        type=Path,
        metavar="FILE",
        help="add or replace this case in the regression file FILE",
    )
    p.add_argument(
        "--cache", type=Path, metavar="DIR", help="where the unpruned export is cached (default EXPORT_DIR/../.colln-cache)"
    )
    return p


def run(
    args: argparse.Namespace,
) -> int:
    batches = parse_ints(args.batch, "--batch")
    if min(batches) < 1:
        raise UsageError(f"--batch sizes must be >= 1, got {args.batch!r}")
    if not 0.0 <= args.tolerance < 1.0:
        raise UsageError(f"--tolerance must be in [0, 1), e.g. 0.1 for 10%, got {args.tolerance}")
    runtimes = tuple(r.strip() for r in args.runtimes.split(",")) if args.runtimes else ()
    if runtimes:
        check_runtimes(runtimes)
    # Both files are read and checked before the timing run, not after it.
    recorded = _read_regression_file(args.regression_file) if args.regression_file else None
    previous = {}
    if args.save_regression_file and args.save_regression_file.exists():
        previous = _read_regression_file(args.save_regression_file)
    like = None
    if recorded is not None:
        like = recorded_timing(recorded, args.regression_file, args.export_dir, args.backend, runtimes, args.device, args.threads)
    report = bench_export(
        args.export_dir, args.backend, batches, timing_options(args, like), args.cache, args.device, runtimes=runtimes
    )
    print_bench(report)
    if args.json:
        atomic_write(args.json, json.dumps(report, indent=2) + "\n")
    if args.save_regression_file:
        atomic_write(args.save_regression_file, json.dumps(merge_case(previous, report), indent=2) + "\n")
    if recorded is not None:
        check_regressions(report, recorded, args.regression_file, args.tolerance)
        print(f"no regression against {args.regression_file} (tolerance {args.tolerance:.0%})")
    return 0


def _read_regression_file(path: Path) -> dict:
    try:
        return check_regression_file(json.loads(Path(path).read_text()), path)
    except OSError as exc:
        raise RegressionFileError(f"cannot read {path} ({exc.strerror}): give an existing JSON file") from exc
    except ValueError as exc:
        raise RegressionFileError(f"{path} is not valid JSON ({exc}): regenerate it with --save-baseline") from exc


main = entry_point(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
