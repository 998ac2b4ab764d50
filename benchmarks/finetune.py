"""The accuracy-recovery table of docs/finetune.md: ``colln-finetune`` on the bundled digits_vit,
10 epochs of the train split each, validated on the 450-image test split, default recipe.

    python benchmarks/finetune.py --runs /tmp/colln-finetune \\
        --json benchmarks/results/finetune_digits.json --plot docs/finetune/loss_colln_vs_cls.png

Runs, one process with one thread each (OMP_NUM_THREADS=1): the unpruned model fine-tuned by the
same recipe (the honest baseline), the three plans of the issue with Col-Ln, rows 1 and 3 again
with [CLS] (loss curves compared in one PNG), then row 1 timed as one process with two threads and
as two processes under torchrun (one thread each; DDP doubles the effective batch, so the schedule
has half the steps). Each run is the exact colln-finetune command recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from colln.report.loss_plot import plot_panels

CLI = [sys.executable, "-m", "colln.app.finetune_cli", "digits_vit"]
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node",
    "2",
    "-m",
    "colln.app.finetune_cli",
    "digits_vit",
]
ROW1 = ["--keep", "0.7", "--layers", "2,4,6"]
ROW3 = ["--keep", "0.5", "--layers", "2,4,6"]
RUNS: list[tuple[str, list[str], list[str], int]] = [
    # name, launcher, plan flags, threads per process
    ("unpruned", CLI, ["--keep", "1.0"], 1),
    ("keep0.7@2,4,6", CLI, ROW1, 1),
    ("keep0.7@0,2,4", CLI, ["--keep", "0.7", "--layers", "0,2,4"], 1),
    ("keep0.5@2,4,6", CLI, ROW3, 1),
    ("keep0.7@2,4,6-cls", CLI, [*ROW1, "--metric", "cls"], 1),
    ("keep0.5@2,4,6-cls", CLI, [*ROW3, "--metric", "cls"], 1),
    ("keep0.7@2,4,6-2threads", CLI, ROW1, 2),
    ("keep0.7@2,4,6-torchrun2", TORCHRUN, ROW1, 1),
]


def run(
    name: str,
    launcher: list[str],
    flags: list[str],
    threads: int,
    runs_dir: Path,
    seed: int,
) -> dict:
    out = runs_dir / f"{name}-seed{seed}"
    flags = [*flags, "--seed", str(seed)]
    cmd = [*launcher, *flags, "--out", str(out), "--force"]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True)
    wall = time.perf_counter() - start
    record = json.loads((out / "finetune.json").read_text())
    return {
        "name": name,
        "command": " ".join(
            [
                "colln-finetune" if launcher is CLI else "torchrun --standalone --nproc_per_node 2 -m colln.app.finetune_cli",
                "digits_vit",
                *flags,
                "--out",
                f"runs/{name}-seed{seed}",
            ]
        ),
        "threads_per_process": threads,
        "world_size": record["world_size"],
        "effective_batch_size": record["effective_batch_size"],
        "before": record["accuracy"]["before"],
        "after": record["accuracy"]["after"],
        "unpruned_original": record["accuracy"]["unpruned_teacher"],
        "token_steps": record["plan"]["token_steps"],
        "flops_ratio": record["plan"]["flops"]["ratio"],
        "train_seconds": round(sum(h["seconds"] for h in record["history"]), 1),
        "median_epoch_seconds": statistics.median(h["seconds"] for h in record["history"]),
        "wall_seconds": round(wall, 1),
        "history": record["history"],
        "record": record,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/colln-finetune"), help="where the runs' output directories go")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/finetune_digits.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/finetune/loss_colln_vs_cls.png"))
    parser.add_argument("--only", nargs="+", default=None, help="run names (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="--seed of every run (default 0)")
    args = parser.parse_args()
    wanted = set(args.only) if args.only else None
    results = [
        run(name, launcher, flags, threads, args.runs, args.seed)
        for name, launcher, flags, threads in RUNS
        if wanted is None or name in wanted
    ]
    by_name = {r["name"]: r for r in results}
    summary = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_avg_at_end": os.getloadavg(),
        },
        "runs": [{k: v for k, v in r.items() if k != "record"} for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    panels = {
        f"{title}: Col-Ln vs [CLS], same seed and recipe": {"Col-Ln": by_name[a]["record"], "[CLS]": by_name[b]["record"]}
        for title, a, b in (
            ("keep 0.7 @ blocks 2,4,6", "keep0.7@2,4,6", "keep0.7@2,4,6-cls"),
            ("keep 0.5 @ blocks 2,4,6", "keep0.5@2,4,6", "keep0.5@2,4,6-cls"),
        )
        if a in by_name and b in by_name
    }
    if panels:
        plot_panels(panels, args.plot)
    for r in results:
        before = f"{100 * r['before']:.1f}" if r["before"] is not None else "-"
        print(
            f"{r['name']:26s} before {before:>5s}%  after {100 * r['after']:.1f}%"
            f"  train {r['train_seconds']:6.1f} s  wall {r['wall_seconds']:6.1f} s"
        )


if __name__ == "__main__":
    main()
