"""Col-Ln prune, Col-Ln + merge, [CLS] prune and ToMe on the bundled digits_vit at matched measured ONNX
Runtime latency, training-free (``sweep``) and after 10 epochs of colln-finetune (``finetune``).

    PYTHONPATH=. python benchmarks/merge_matched.py sweep --json benchmarks/results/merge_matched_digits.json
    PYTHONPATH=. python benchmarks/merge_matched.py rescore --json benchmarks/results/merge_matched_digits.json
    PYTHONPATH=. python benchmarks/merge_matched.py finetune --sweep-json benchmarks/results/merge_matched_digits.json \\
        --runs /tmp/colln-merge-ft --json benchmarks/results/merge_finetune_digits.json

``sweep``: colln-eval's configurations (:func:`colln.measure.sweep.configurations`: keep x layers,
Col-Ln pruned and merged, [CLS] pruned, and ToMe's r at every block) exported to ONNX Runtime, top-1 on the 450
digits test images, then every configuration and the unpruned model timed interleaved in one run
(:func:`colln.infer.timing.measure`, every batch size; speedups are paired per-round medians).
Only the timing holds ``--quiet-flag``; the exports wait while another holds it. Matched latency:
for each ToMe point (r at every block), each other method's most accurate configuration whose
median latency at that batch size is at most ToMe's, from the same run. The budgets are the ToMe
points nearest FLOPs 0.4 and 0.25.

``rescore``: a sweep's configurations exported and scored again, its latencies kept (for a change
to what a method computes that leaves its graph's shape and cost alone); refused when a
configuration's token counts changed.

``finetune``: ``colln-finetune digits_vit`` (10 epochs, default recipe, seed 0, one thread each,
two at a time) of the unpruned model and of every configuration the sweep matched at a budget
(Col-Ln prune, Col-Ln + merge, ToMe; either batch size); top-1 on the test split after the last
epoch, from each run's finetune.json (a run already finished in ``--runs`` is reused, and with
``--reuse REPORT`` every run of that earlier report not finished in ``--runs``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from colln.data import load_labelled, preprocess
from colln.export.artifact import export_into
from colln.export.spec import ExportSpec
from colln.infer.runners import open_runner, run
from colln.infer.timing import Timing, measure
from colln.measure.sweep import configurations

# Every configuration is an ONNX export (seconds each, minutes on a loaded machine): keep rates per
# layer set spanning FLOPs 0.28-0.53, around ToMe's latencies at the two budgets.
PLANS = {(1, 3): (0.3, 0.4, 0.5, 0.6), (0, 1, 2, 3): (0.6, 0.7)}
TOME_RS = (10, 13, 19)
FLOPS_TARGETS = (0.4, 0.25)
# series name -> (method, metric) of the keep-schedule configurations
SERIES = {
    "Col-Ln prune": ("prune", "colln"),
    "Col-Ln + merge": ("merge", "colln"),
    "[CLS] prune": ("prune", "cls"),
}
FINETUNED = ("Col-Ln prune", "Col-Ln + merge")  # plus ToMe and the unpruned model


def describe(spec: ExportSpec) -> tuple[str, str, list[str]]:
    """(method, plan text, colln-export / colln-finetune plan flags) of a configuration."""
    c = spec.pruning
    if c.tome is not None:
        return "tome", f"ToMe r={c.tome}", ["--tome", str(c.tome)]
    layers = ",".join(map(str, c.layers))
    flags = ["--keep", f"{c.keep:g}", "--layers", layers, "--metric", c.metric]
    method = "merge" if c.merge else "prune"
    return method, f"keep {c.keep:g} at {layers}", [*flags, "--merge"] if c.merge else flags


def wait_quiet(flag: Path | None) -> None:
    """Sleep while someone else times on a shared machine (holds its quiet flag)."""
    while flag is not None and flag.exists():
        time.sleep(10)


@contextlib.contextmanager
def quiet(flag: Path | None, name: str = "mergenum"):
    """Hold a shared machine's quiet flag while timing: wait until no one holds it, write ours,
    remove it afterwards only if it is still ours."""
    if flag is None:
        yield
        return
    wait_quiet(flag)
    flag.write_text(name + "\n")
    try:
        yield
    finally:
        if flag.exists() and flag.read_text().strip() == name:
            flag.unlink()


def matched(rows: list[dict], batch: str) -> list[dict]:
    """Per ToMe point: each series' most accurate configuration within ToMe's median latency."""
    out = []
    for tome in sorted((r for r in rows if r["method"] == "tome"), key=lambda r: r["flops_ratio"], reverse=True):
        limit = tome["latency"][batch]["p50_ms"]
        entry = {"tome": tome["key"], "p50_ms": limit, "best": {}}
        for name, (method, metric) in SERIES.items():
            fits = [r for r in rows if (r["method"], r["metric"]) == (method, metric) and r["latency"][batch]["p50_ms"] <= limit]
            best = max(fits, key=lambda r: (r["accuracy"], -r["latency"][batch]["p50_ms"]), default=None)
            entry["best"][name] = best["key"] if best is not None else None
        merge = entry["best"]["Col-Ln + merge"]
        by_key = {r["key"]: r for r in rows}
        entry["merge_ge_tome"] = merge is not None and by_key[merge]["accuracy"] >= tome["accuracy"]
        out.append(entry)
    return out


def sweep_specs() -> tuple[list[ExportSpec], object]:
    """The unpruned spec, every keep-schedule configuration, then ToMe's; and the unpruned model."""
    base = ExportSpec("digits_vit", weights="bundled")
    specs = [
        base.unpruned(),
        *(
            spec
            for layers, keeps in PLANS.items()
            for metric, methods in (("colln", ("prune", "merge")), ("cls", ("prune",)))
            for spec in configurations(base, keeps, [layers], [metric], (4.0,), methods)
        ),
        *configurations(base, (), (), (), (), ("tome",), TOME_RS),
    ]
    return specs, base.load_unpruned()


def export_and_score(
    specs: list[ExportSpec], unpruned, images, labels, scratch: str, stack: contextlib.ExitStack, args: argparse.Namespace
) -> tuple[list[dict], dict]:
    """Export every configuration to ONNX Runtime and score it on the test images: (rows, runners by index)."""
    rows, runners = [], {}
    for i, spec in enumerate(specs):
        out = Path(scratch) / str(i)
        out.mkdir()
        wait_quiet(args.quiet_flag)
        plan = export_into(spec, out, unpruned=unpruned).plan
        runner = stack.enter_context(open_runner(out, "onnxruntime", threads=args.threads))
        method, text, flags = describe(spec) if i else ("none", "unpruned", ["--keep", "1.0"])
        c = spec.pruning
        layers = ".".join(map(str, c.layers or ()))
        key = {"none": "unpruned", "tome": f"tome-r{c.tome}"}.get(method, f"{c.metric}-{method}-keep{c.keep:g}-L{layers}")
        flops = plan.flops()
        rows.append(
            {
                "key": key,
                "method": method,
                "metric": spec.pruning.metric,
                "plan": text,
                "flags": flags,
                "token_steps": list(plan.tokens_in),
                "flops_ratio": flops.pruned / flops.full,
                "accuracy": float((run(runner, images, 64).argmax(-1) == labels).mean()),
            }
        )
        runners[str(i)] = runner
    return rows, runners


def cmd_sweep(args: argparse.Namespace) -> None:
    specs, unpruned = sweep_specs()
    data = load_labelled("digits", unpruned)
    images = preprocess(data.images, unpruned).numpy()
    with tempfile.TemporaryDirectory(prefix="colln-merge-matched-") as scratch, contextlib.ExitStack() as stack:
        rows, runners = export_and_score(specs, unpruned, images, data.labels, scratch, stack, args)
        with quiet(args.quiet_flag):
            load_before = os.getloadavg()
            timing = Timing(rounds=args.rounds, warmup=args.warmup)
            timed = measure(runners, images.shape[1:], args.batches, timing, baseline="0", sample=images)
            load_after = os.getloadavg()
    for b, comparison in timed.items():
        for i, row in enumerate(rows):
            stats = comparison.stats[str(i)]
            speedup = comparison.speedups.get(str(i), (1.0, 1.0, 1.0))
            row.setdefault("latency", {})[str(b)] = {"p50_ms": stats.p50_ms, "speedup": speedup[0], "iqr": speedup[1:]}
    report = {
        "model": "digits_vit",
        "backend": "onnxruntime",
        "threads": args.threads,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "images": len(images),
        "load_avg_before_timing": load_before,
        "load_avg_after_timing": load_after,
        "budgets": {
            str(t): min((r for r in rows if r["method"] == "tome"), key=lambda r: abs(r["flops_ratio"] - t))["key"]
            for t in FLOPS_TARGETS
        },
        "matched": {str(b): matched(rows, str(b)) for b in args.batches},
        "rows": rows,
    }
    for b in args.batches:
        print_matched(str(b), report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def cmd_rescore(args: argparse.Namespace) -> None:
    """Export and score every configuration again and rewrite the sweep's accuracies and matches,
    keeping its latencies (the timing needs a quiet machine; a change to a method's math, such as
    ToMe's partition, changes what it computes but not the shape or cost of its graph)."""
    report = json.loads(args.json.read_text())
    specs, unpruned = sweep_specs()
    data = load_labelled("digits", unpruned)
    images = preprocess(data.images, unpruned).numpy()
    with tempfile.TemporaryDirectory(prefix="colln-merge-matched-") as scratch, contextlib.ExitStack() as stack:
        rows = export_and_score(specs, unpruned, images, data.labels, scratch, stack, args)[0]
    old = {r["key"]: r for r in report["rows"]}
    if sorted(old) != sorted(r["key"] for r in rows):
        raise SystemExit(f"{args.json} has other configurations than this sweep: run the sweep instead")
    for row in rows:
        if old[row["key"]]["token_steps"] != row["token_steps"]:
            raise SystemExit(f"{row['key']}: token counts changed, its latency no longer applies: run the sweep instead")
        old[row["key"]]["accuracy"] = row["accuracy"]
    report["matched"] = {b: matched(report["rows"], b) for b in report["matched"]}
    report["accuracy_rescored"] = "accuracies re-scored without re-timing; latencies from the original sweep"
    for b in report["matched"]:
        print_matched(b, report)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


def print_matched(batch: str, report: dict) -> None:
    by_key = {r["key"]: r for r in report["rows"]}
    base = by_key["unpruned"]
    print(f"\nbatch {batch}: unpruned {100 * base['accuracy']:.1f}% at {base['latency'][batch]['p50_ms']:.3g} ms")
    print("| ToMe point (FLOPs) | ToMe | " + " | ".join(SERIES) + " | merge >= ToMe |")
    print("|---" * (len(SERIES) + 3) + "|")
    for m in report["matched"][batch]:
        t = by_key[m["tome"]]
        cells = [cell(t, batch)] + [cell(by_key[m["best"][n]], batch) if m["best"][n] else "none fits" for n in SERIES]
        print(f"| {t['plan']} ({t['flops_ratio']:.2f}) | " + " | ".join(cells) + f" | {'yes' if m['merge_ge_tome'] else 'no'} |")


def cell(r: dict, batch: str) -> str:
    lat = r["latency"][batch]
    return f"{100 * r['accuracy']:.1f} ({r['plan']}; {lat['p50_ms']:.3g} ms, {lat['speedup']:.2f}x, FLOPs {r['flops_ratio']:.2f})"


def finetune_one(name: str, flags: list[str], runs: Path, seed: int) -> dict:
    out = runs / name
    cli = [sys.executable, "-m", "colln.app.finetune_cli", "digits_vit"]
    cmd = [*cli, *flags, "--seed", str(seed), "--out", str(out), "--force"]
    print(f"[{name}] colln-finetune digits_vit {' '.join(flags)}", flush=True)
    if not (out / "finetune.json").exists():  # a finished run in --runs is reused
        subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, stdout=subprocess.DEVNULL)
    record = json.loads((out / "finetune.json").read_text())
    return {
        "name": name,
        "command": " ".join(["colln-finetune", "digits_vit", *flags, "--seed", str(seed), "--out", f"runs/{name}"]),
        "before": record["accuracy"]["before"],
        "after": record["accuracy"]["after"],
        "flops_ratio": record["plan"]["flops"]["ratio"],
        "train_seconds": round(sum(h["seconds"] for h in record["history"]), 1),
        "history": [h["val_acc"] for h in record["history"]],
    }


def cmd_finetune(args: argparse.Namespace) -> None:
    swept = json.loads(args.sweep_json.read_text())
    by_key = {r["key"]: r for r in swept["rows"]}
    runs: dict[str, list[str]] = {"unpruned": ["--keep", "1.0"]}
    chosen = []
    for batch, points in swept["matched"].items():
        for target, tome in swept["budgets"].items():
            point = next(m for m in points if m["tome"] == tome)
            for name, key in [("ToMe", tome), *((n, point["best"][n]) for n in FINETUNED)]:
                if key is None:
                    continue
                runs.setdefault(key, by_key[key]["flags"])
                chosen.append({"batch": int(batch), "flops_target": float(target), "series": name, "key": key})
    args.runs.mkdir(parents=True, exist_ok=True)
    # Runs of an earlier report are taken from it unless finished again in --runs (re-run only what changed).
    earlier = {r["name"]: r for r in json.loads(args.reuse.read_text())["runs"]} if args.reuse else {}

    def one(name: str, flags: list[str]) -> dict:
        if name in earlier and not (args.runs / name / "finetune.json").exists():
            return earlier[name]
        return finetune_one(name, flags, args.runs, args.seed)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda item: one(*item), runs.items()))
    done = {r["name"]: r for r in results}
    baseline = done["unpruned"]["after"]
    print(f"\nfine-tuned unpruned baseline {100 * baseline:.1f}%")
    for c in chosen:
        r = done[c["key"]]
        delta = 100 * (r["after"] - baseline)
        print(
            f"batch {c['batch']} FLOPs ~{c['flops_target']:g} {c['series']:15s} {c['key']:40s} "
            f"{100 * r['before']:.1f}% -> {100 * r['after']:.1f}% ({delta:+.1f} vs baseline)"
        )
    report = {"seed": args.seed, "baseline": baseline, "chosen": chosen, "runs": results}
    args.json.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="training-free, latency-matched")
    s.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[1, 8])
    s.add_argument("--rounds", type=int, default=100)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--quiet-flag", type=Path, default=None, help="a shared machine's quiet flag, held while timing")
    s.add_argument("--json", type=Path, default=None)
    s = sub.add_parser("rescore", help="re-score a sweep's configurations, keeping its latencies")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--quiet-flag", type=Path, default=None, help="a shared machine's quiet flag (waited for, not held)")
    s.add_argument("--json", type=Path, required=True, help="the sweep's report, rewritten in place")
    f = sub.add_parser("finetune", help="fine-tune the matched configurations and the unpruned model")
    f.add_argument("--sweep-json", type=Path, required=True)
    f.add_argument("--runs", type=Path, default=Path("/tmp/colln-merge-ft"))
    f.add_argument("--json", type=Path, required=True)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--jobs", type=int, default=2, help="fine-tunes at a time (one thread each)")
    f.add_argument("--reuse", type=Path, default=None, help="an earlier finetune report: its runs are not trained again")
    args = parser.parse_args()
    {"sweep": cmd_sweep, "rescore": cmd_rescore, "finetune": cmd_finetune}[args.command](args)


if __name__ == "__main__":
    main()
