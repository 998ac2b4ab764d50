"""Markdown results tables from colln-bench JSON reports (``--json``), for docs/benchmarks.md.

    python benchmarks/table.py benchmarks/results/*-colln-keep0.7*.json > benchmarks/results/table.md
(as ``benchmarks/run_all.sh pruning`` runs it); a stacked report (``--runtimes``) gives one row per
runtime and precision, pruned over the same runtime's unpruned:
    python benchmarks/table.py --stack benchmarks/results/families-*.json > benchmarks/results/families.md
(as ``benchmarks/run_all.sh families`` runs it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(report: dict) -> list[str]:
    spec, env = report["spec"], report["environment"]
    pruning = spec.get("pruning", spec)  # reports written before the restructure kept these at the top
    keep = pruning["keep"] if not isinstance(pruning["keep"], list) else ",".join(str(k) for k in pruning["keep"])
    layers = ",".join(str(i) for i in pruning["layers"]) if pruning["layers"] else "default"
    out = []
    for batch, r in report["batches"].items():
        u, p = r["unpruned"], r["pruned"]
        out.append(
            f"| {spec['model']} | {pruning['metric']} {keep} @ {layers} | {batch} | {report['backend']} ({env['threads']} thr) "
            f"| {u['p50_ms']:.1f} | {p['p50_ms']:.1f} | {u['images_per_s']:.2f} / {p['images_per_s']:.2f} "
            f"| **{r['speedup']:.3f}** ({r['speedup_iqr'][0]:.2f}-{r['speedup_iqr'][1]:.2f}) | {r['bound']:.3f} "
            f"| **{r['efficiency']:.3f}** | {env['machine']} |"
        )
    return out


HEADER = (
    "| model | plan | batch | backend | unpruned p50 ms | pruned p50 ms | img/s unpruned / pruned "
    "| speedup (IQR) | bound | efficiency | machine |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


STACK_HEADER = (
    "| model | tokens | batch | runtime:precision | unpruned p50 ms | pruned p50 ms | speedup (IQR) | bound | efficiency |"
    "\n|---|---|---|---|---|---|---|---|---|"
)


def stack_rows(report: dict) -> list[str]:
    """Pruned over the same runtime's unpruned at the same precision, one row per pair of the stack."""
    stack, spec = report["stack"], report["spec"]
    size = spec.get("img_size")
    model = spec["model"] + (f" @{size}px" if size else "")
    steps = report["plan"].split("tokens ", 1)[1].split(";", 1)[0]
    bound = stack["flops_bound"]
    out = []
    for batch, rows in stack["batches"].items():
        for name, row in rows.items():
            if "unpruned-" in name:
                continue
            own = rows[name.replace("pruned-", "unpruned-", 1)]
            ratio = row["speedup_same_runtime"]
            iqr = row.get("speedup_same_runtime_iqr")
            spread = f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else ""
            variant = name.replace("pruned-", "") if ":" in name else f"onnxruntime:{name.replace('pruned-', '')}"
            out.append(
                f"| {model} | {steps} | {batch} | {variant} | {own['p50_ms']:.1f} | {row['p50_ms']:.1f} "
                f"| **{ratio:.2f}x**{spread} | {bound:.2f}x | **{ratio / bound:.2f}** |"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--stack"]:
        reports = [json.loads(Path(p).read_text()) for p in args[1:]]
        print("\n".join([STACK_HEADER] + [line for r in reports for line in stack_rows(r)]))
        return 0
    paths = [Path(p) for p in args]
    reports = []
    for path in paths:
        data = json.loads(path.read_text())
        reports += data if isinstance(data, list) else data.get("cases", [data])
    # One model's rows together, smallest batch first, whichever files they came from.
    split = [
        (r["spec"]["model"], int(batch), {**r, "batches": {batch: row}}) for r in reports for batch, row in r["batches"].items()
    ]
    lines = [HEADER] + [line for _, _, r in sorted(split, key=lambda t: t[:2]) for line in rows(r)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
