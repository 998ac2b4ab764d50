"""colln-bench: latency and throughput of an export against its unpruned counterpart, the FLOPs
bound of its keep plan, and a regression check of the ratios against a stored baseline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from colln.app.cli import ArgumentParser, parse_ints, run_main
from colln.errors import CollnError, UsageError, ValidationFailedError
from colln.runtime.bench import bench_export, find_case, merge_case, regressions
from colln.runtime.runners import BACKENDS


class BaselineError(CollnError):
    stage = "baseline"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="colln-bench",
        description="Time a colln export and its unpruned counterpart, interleaved round by round; "
        "report latency percentiles, throughput, speedup, the FLOPs bound and efficiency = speedup / bound.",
    )
    p.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="a colln-export output directory")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help="runtime to time (default onnxruntime)")
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--rounds", type=int, default=50, help="timed rounds per batch size (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed rounds first (default 10)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device for the torch and onnxruntime backends (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, pinned for stable numbers; 0 = backend default (default 1)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the full report as JSON")
    p.add_argument("--baseline", type=Path, metavar="FILE", help="fail (exit 1) if speedup or efficiency fell below this baseline")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed relative drop below the baseline (default 0.10)")
    p.add_argument("--save-baseline", type=Path, metavar="FILE", help="add or replace this case in a baseline file")
    p.add_argument("--cache", type=Path, metavar="DIR", help="where the unpruned export is cached (default EXPORT_DIR/../.colln-cache)")
    p.add_argument("--verbose", action="store_true", help="tracebacks on errors")
    return p


def main(
    argv: Sequence[str] | None = None,
) -> int:
    return run_main(_main, build_parser(), argv)


def _main(args: argparse.Namespace) -> int:
    batches = parse_ints(args.batch, "--batch")
    if min(batches) < 1:
        raise UsageError(f"--batch sizes must be >= 1, got {args.batch!r}")
    if not 0.0 <= args.tolerance < 1.0:
        raise UsageError(f"--tolerance must be in [0, 1), e.g. 0.1 for 10%, got {args.tolerance}")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0 (0 = backend default), got {args.threads}")
    baseline = _read_json(args.baseline) if args.baseline else None
    report = bench_export(args.export_dir, args.backend, batches, args.rounds, args.warmup, args.threads, args.cache, args.device)
    print_report(report)
    if args.json:
        _write_json(args.json, report)
    if args.save_baseline:
        previous = _read_json(args.save_baseline) if args.save_baseline.exists() else {}
        _write_json(args.save_baseline, merge_case(previous, report))
    if baseline is not None:
        check_baseline(report, baseline, args.baseline, args.tolerance)
    return 0


def check_baseline(
    report: dict,
    baseline: dict,
    source: Path,
    tolerance: float,
) -> None:
    """Raise ValidationFailedError (exit 1) naming every ratio that regressed."""
    case = find_case(baseline, report)
    if case is None:
        raise BaselineError(f"{source} has no entry for {report['case']}: record one with --save-baseline {source}")
    found = regressions(report, case, tolerance)
    if found:
        raise ValidationFailedError(f"regression against {source}: " + "; ".join(found), stage="bench")
    print(f"no regression against {source} (tolerance {tolerance:.0%})")


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = report["environment"]
    table = Table(title=f"{report['case']}  |  {report['plan']}", title_justify="left")
    for col in ("batch", "unpruned p50/p90/p99 ms", "pruned p50/p90/p99 ms", "unpruned img/s", "pruned img/s"):
        table.add_column(col, justify="right")
    for col in ("speedup (IQR)", "bound", "efficiency"):
        table.add_column(col, justify="right", style="bold")
    for batch, r in report["batches"].items():
        u, p = r["unpruned"], r["pruned"]
        table.add_row(
            batch,
            f"{u['p50_ms']:.2f} / {u['p90_ms']:.2f} / {u['p99_ms']:.2f}",
            f"{p['p50_ms']:.2f} / {p['p90_ms']:.2f} / {p['p99_ms']:.2f}",
            f"{u['images_per_s']:.1f}",
            f"{p['images_per_s']:.1f}",
            f"{r['speedup']:.3f} ({r['speedup_iqr'][0]:.2f}-{r['speedup_iqr'][1]:.2f})",
            f"{r['bound']:.3f}",
            f"{r['efficiency']:.3f}",
        )
    # CI logs are not terminals (rich would assume 80 columns and wrap every cell).
    console = Console(width=max(Console().width, 150))
    console.print(table)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    load = " -> ".join(f"{x[0]:.2f}" for x in (env["loadavg_before"], env["loadavg_after"]) if x)
    console.print(
        f"{report['backend']} on {report['device']}, threads {env['threads']}, {report['rounds']} rounds after {report['warmup']} warm-up, "
        f"interleaved | machine {env['machine']} ({env['cpu']}, {env['cpus']} cpus, load {load}) | {versions}",
        highlight=False,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise BaselineError(f"cannot read {path} ({exc.strerror}): give an existing JSON file") from exc
    except ValueError as exc:
        raise BaselineError(f"{path} is not valid JSON ({exc}): regenerate it with --save-baseline") from exc


def _write_json(
    path: Path,
    data: dict,
) -> None:
    """Write whole or not at all: a temp file beside ``path``, then an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path} ({exc.strerror}): choose a writable path", stage="output") from exc


if __name__ == "__main__":
    sys.exit(main())
