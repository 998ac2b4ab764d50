"""Time several exports against each other in one run, interleaved round by round.

    python benchmarks/compare.py REF_EXPORT OTHER_EXPORT [...] [--batch 1,8] [--rounds 40] [--warmup N] [--threads 1]
        [--backend onnxruntime]
As ``benchmarks/run_all.sh pruning`` runs it (results/<model>-colln-vs-cls.txt), per model:
    python benchmarks/compare.py $EXPORTS/deit_small-cls-keep0.7 $EXPORTS/deit_small-colln-keep0.7 \\
        --batch 1,8 --rounds 30 --warmup 3 --threads 1 | tee benchmarks/results/deit_small-colln-vs-cls.txt

For each batch size: every export's p50 latency and its paired speedup over the first one (median
of per-round ratios, with the interquartile range). Used to decide between formulations (ops.py
variants, [CLS] vs Col-Ln at one plan, round_to) on a noisy machine: only ratios are compared.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from colln.app.cli import parse_ints
from colln.export.spec import INPUT_NAME
from colln.infer.runners import open_runner
from colln.infer.timing import Timing, measure


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exports", nargs="+", type=Path)
    p.add_argument("--batch", default="1,8")
    # Formulations are compared on one thread, over many rounds.
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=Timing.warmup)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="onnxruntime")
    args = p.parse_args(argv)
    timing = Timing(rounds=args.rounds, warmup=args.warmup, threads=args.threads)
    names = [d.name for d in args.exports]
    with contextlib.ExitStack() as stack:
        runners = {
            n: stack.enter_context(open_runner(d, args.backend, threads=timing.threads, split_batches=timing.split_batches))
            for n, d in zip(names, args.exports)
        }
        chw = tuple(runners[names[0]].get_input_metadata(use_numpy_dtypes=False)[INPUT_NAME].shape[1:])
        batches = parse_ints(args.batch, "--batch")
        for b, compared in measure(runners, chw, batches, timing, baseline=names[0]).items():
            print(f"batch {b}, {args.backend}, interleaved, {timing.describe()}:")
            for n in names:
                ratio, lo, hi = compared.speedups.get(n, (1.0, 1.0, 1.0))
                print(f"  {n:>40}: p50 {compared.stats[n].p50_ms:9.2f} ms  {ratio:.3f}x vs {names[0]} (IQR {lo:.3f}-{hi:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
