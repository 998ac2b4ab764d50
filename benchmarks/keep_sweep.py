"""Speedup vs keep rate against the FLOPs bound: export one model at several keep rates, time each
against the (cached) unpruned model with colln-bench, and plot.

    python benchmarks/keep_sweep.py deit_small --keep 0.5,0.6,0.7,0.8,0.9 --batch 8 --rounds 30 --warmup 3 \\
        --exports /tmp/colln-bench --json benchmarks/results/keep_sweep_deit_small.json \\
        --plot docs/benchmarks/speedup_vs_keep.png
(as ``benchmarks/run_all.sh pruning`` runs it).

Exports go to ``--exports`` (large for vit_base: keep them out of the repo); timing weights are
random (latency does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from colln.app.cli import parse_floats, parse_ints
from colln.export.artifact import default_out_dir, export_into
from colln.export.spec import SPEC_FILE, ExportSpec
from colln.files import atomic_dir
from colln.infer.timing import Timing
from colln.measure.bench import bench_export
from colln.models.config import PruneConfig


def sweep(
    model: str,
    keeps: tuple[float, ...],
    layers: tuple[int, ...],
    batch: int,
    rounds: int,
    warmup: int,
    threads: int,
    exports: Path,
) -> list[dict]:
    reports = []
    for keep in keeps:
        spec = ExportSpec(model=model, weights="random", pruning=PruneConfig(keep=keep, layers=layers))
        out = default_out_dir(spec, exports)
        if not out.exists():
            with atomic_dir(out, marker=SPEC_FILE) as tmp:
                export_into(spec, tmp)
        report = bench_export(out, batches=(batch,), timing=Timing(rounds=rounds, warmup=warmup, threads=threads))
        r = report["batches"][str(batch)]
        print(f"keep {keep}: speedup {r['speedup']:.3f} (IQR {r['speedup_iqr'][0]:.3f}-{r['speedup_iqr'][1]:.3f}), "
              f"bound {r['bound']:.3f}, efficiency {r['efficiency']:.3f}", flush=True)  # fmt: skip
        reports.append(report)
    return reports


def plot(
    reports: list[dict],
    batch: int,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keeps = [r["spec"]["pruning"]["keep"] for r in reports]
    rows = [r["batches"][str(batch)] for r in reports]
    speedup = [row["speedup"] for row in rows]
    low = [row["speedup"] - row["speedup_iqr"][0] for row in rows]
    high = [row["speedup_iqr"][1] - row["speedup"] for row in rows]
    env = reports[0]["environment"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(keeps, [row["bound"] for row in rows], "k--", label="FLOPs bound (full / pruned FLOPs)")
    ax.errorbar(keeps, speedup, yerr=[low, high], fmt="o-", capsize=3, label="measured speedup (median, IQR)")
    for k, s, row in zip(keeps, speedup, rows):
        ax.annotate(f"{row['efficiency']:.0%}", (k, s), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel(f"keep rate at blocks {', '.join(str(i) for i in reports[0]['spec']['pruning']['layers'])}")
    ax.set_ylabel("speedup over unpruned")
    ax.set_title(
        f"{reports[0]['spec']['model']}, batch {batch}, {reports[0]['backend']} CPU, {env['threads']} thread(s)", fontsize=10
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.text(
        0.01,
        0.01,
        f"{env['machine']}, {reports[0]['rounds']} interleaved rounds; labels: efficiency = speedup / bound",
        fontsize=6,
    )
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--keep", default="0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--layers", default="3,6,9")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--exports", type=Path, default=Path("/tmp/colln-sweep"))
    p.add_argument("--json", type=Path, help="write the reports here")
    p.add_argument("--plot", type=Path, help="write the PNG here")
    p.add_argument("--from-json", type=Path, help="only re-plot reports written earlier by --json")
    args = p.parse_args(argv)
    if args.from_json:
        reports = json.loads(args.from_json.read_text())
    else:
        reports = sweep(args.model, parse_floats(args.keep, "--keep"), parse_ints(args.layers, "--layers"),
                        args.batch, args.rounds, args.warmup, args.threads, args.exports)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports, indent=2) + "\n")
    if args.plot:
        plot(reports, args.batch, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
