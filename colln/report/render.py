"""Text renderings (markdown, rich tables) of what the commands compute: the export report, validation,
benchmarks and evaluation sweeps. Nothing here computes a number."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from colln.infer.environment import describe_cpu_flags
from colln.infer.timing import Timing
from colln.measure.sweep import METRIC_LABELS, Sweep
from colln.report.schema import ExportReport, Operation, Stack, Tokens
from colln.verify.validate import ValidationReport

if TYPE_CHECKING:
    from rich.table import Table


def result_table(
    report: ExportReport,
    out: Path,
    extra: Sequence[tuple[str, str]] = (),
) -> Table:
    """The result as a two-column rich table."""
    from rich.table import Table

    m, e, f = report.model, report.export, report.flops
    table = Table(title=f"colln-export {m.name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{m.name} ({m.weights} weights, {m.params / 1e6:.2f}M params, input {tuple(m.input_size)})")
    table.add_row("plan", plan_line(report.plan))
    for i, line in enumerate(operation_lines(report.operations)):
        table.add_row("" if i else "operations", line)
    table.add_row("TopK K", ", ".join(str(k) for k in e.topk_k) or "none (unpruned)")
    table.add_row("FLOPs", f"{f.pruned / 1e9:.3g} G of {f.full / 1e9:.3g} G ({f.ratio:.2f}x), bound {f.bound:.2f}x")
    if report.tokens is not None:
        table.add_row("tokens", tokens_line(report.tokens))
    table.add_row("ONNX", f"{out / e.onnx} ({e.onnx_bytes / 1e6:.1f} MB, opset {e.opset}, {e.precision})")
    _validation_rows(table, report.validation)
    ov = report.openvino
    if ov is not None:
        a = ov.artifact
        table.add_row(
            "OpenVINO",
            f"{out / a.file} ({a.precision}; OpenVINO ran {a.inference_precision}, {_options(a.options)})",
        )
        _validation_rows(table, ov.validation)
    lat = report.latency
    if lat is not None:
        for b, r in lat.batches.items():
            table.add_row(
                f"latency b={b}",
                f"pruned {r.pruned.p50_ms:.2f} ms / unpruned {r.unpruned.p50_ms:.2f} ms (p50), "
                f"speedup {r.speedup:.2f}x (bound {lat.flops_bound:.2f}x)",
            )
    for line in stack_lines(report.stack):
        table.add_row("stack", line)
    for row in extra:
        table.add_row(*row)
    table.add_row("output", str(out))
    return table


def _validation_rows(
    table: Table,
    v: ValidationReport | None,
) -> None:
    if v is None:
        return
    verdict = "[green]passed[/]" if v.passed else "[red]FAILED[/]"
    table.add_row("validation", f"{verdict}: {v.backend} vs torch on {v.images} images ({v.source})")
    for line in validation_lines(v):
        table.add_row("", line)


def stack_lines(
    stack: Stack | None,
) -> list[str]:
    """One line per batch size of the variant stack: each variant's speedup over ONNX Runtime's unpruned fp32."""
    if stack is None:
        return []
    lines = []
    for b, rows in stack.batches.items():
        cells = ", ".join(f"{name} {r.speedup:.2f}x" for name, r in rows.items() if name != stack.baseline)
        lines.append(f"b={b}: {cells} (over {stack.baseline} {rows[stack.baseline].p50_ms:.1f} ms)")
    if stack.accuracy is not None and stack.accuracy.accuracy:
        lines.append("accuracy: " + ", ".join(f"{n} {x:.4f}" for n, x in stack.accuracy.accuracy.items()))
    return lines


def stack_markdown(
    stack: Stack,
) -> list[str]:
    """The variant stack as a markdown table: one row per (batch, variant), then the artifact and
    options behind each variant's figures."""
    acc = stack.accuracy
    accuracy = (acc.accuracy or {}) if acc is not None else {}
    agreement = acc.top1_agreement if acc is not None else {}
    lines = [
        f"## Variant stack (speedup over {stack.baseline}, one interleaved run; FLOPs bound of pruning {stack.flops_bound:.2f}x)",
        "",
        "| batch | variant | p50 ms | p90 ms | p99 ms | images/s | speedup (IQR) | over own unpruned | accuracy | "
        "top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b, rows in stack.batches.items():
        for name, r in rows.items():
            a = f"{accuracy[name]:.4f}" if name in accuracy else "-"
            g = f"{agreement[name]:.3f}" if name in agreement else "-"
            own = "-" if r.speedup_same_runtime is None else f"{r.speedup_same_runtime:.2f}x"
            if r.speedup_same_runtime_iqr is not None:
                own += f" ({r.speedup_same_runtime_iqr[0]:.2f}-{r.speedup_same_runtime_iqr[1]:.2f})"
            lines.append(
                f"| {b} | {name} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | {r.images_per_s:.1f} | "
                f"{r.speedup:.2f}x ({r.speedup_iqr[0]:.2f}-{r.speedup_iqr[1]:.2f}) | {own} | {a} | {g} |"
            )
    if acc is not None:
        lines += ["", f"Top-1 on {acc.images} images ({acc.source}); agreement with {stack.baseline}."]
    if stack.artifacts:
        lines += ["", "Timed artifacts:", ""]
        lines += [
            f"- {n}: `{a.artifact}` ({a.runtime}, {_options(a.options)}"
            + (f"; matrix products {products_line(a.runtime_precisions)})" if a.runtime_precisions is not None else ")")
            for n, a in stack.artifacts.items()
        ]
    return lines


def products_line(
    counts: dict[str, int],
) -> str:
    """``{"bf16": 40, "u8": 36}`` as ``bf16 40, u8 36`` (matrix products per runtime precision)."""
    return ", ".join(f"{precision} {n}" for precision, n in counts.items()) or "none"


def _options(
    options: dict,
) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "default session options"


def _validation_markdown(
    v: ValidationReport,
) -> list[str]:
    lines = [f"- {line}" for line in validation_lines(v)]
    return lines + [f"- mismatch: {x}" for x in v.mismatches] + [f"- warning: {x}" for x in v.warnings]


def report_markdown(
    report: ExportReport,
) -> str:
    """A short human summary of report.json."""
    m, plan, f, e = report.model, report.plan, report.flops, report.export
    lines = [
        f"# {m.name}: {'ToMe' if plan.get('tome') is not None else plan['metric']} keep plan",
        "",
        f"- Plan: {plan['summary']}",
        *operations_markdown(report.operations),
        f"- FLOPs: {f.pruned / 1e9:.3g} G of {f.full / 1e9:.3g} G per image (bound {f.bound:.2f}x)",
        f"- ONNX: `{e.onnx}`, opset {e.opset}, {e.precision}, TopK K = {e.topk_k}",
        f"- Weights: {m.weights}",
    ]
    if report.tokens is not None:
        lines.append(f"- Tokens: {tokens_line(report.tokens)}")
    v = report.validation
    if v is not None:
        lines += [
            "",
            f"## Validation: {'passed' if v.passed else 'FAILED'} ({v.backend} vs torch, {v.images} images, {v.source})",
            "",
            *_validation_markdown(v),
        ]
    ov = report.openvino
    if ov is not None:
        a, w = ov.artifact, ov.validation
        lines += ["", f"## OpenVINO: `{a.file}` ({a.precision}; OpenVINO ran {a.inference_precision})"]
        if a.runtime_precisions is not None:
            lines += ["", f"Matrix products by runtime precision (its execution graph): {products_line(a.runtime_precisions)}"]
        if w is not None:
            lines += [
                "",
                f"Validation: {'passed' if w.passed else 'FAILED'} ({w.backend} vs torch, {w.images} images)",
                "",
                *_validation_markdown(w),
            ]
    lat = report.latency
    if lat is not None:
        lines += ["", f"## Latency ({lat.backend}, {lat.timing.describe()}, pruned and unpruned interleaved)", ""]
        lines += [
            "| batch | rounds | pruned p50 ms | unpruned p50 ms | pruned p90 ms | unpruned p90 ms | speedup | FLOPs bound |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for b, r in lat.batches.items():
            lines.append(
                f"| {b} | {r.pruned.rounds} | {r.pruned.p50_ms:.2f} | {r.unpruned.p50_ms:.2f} | "
                f"{r.pruned.p90_ms:.2f} | {r.unpruned.p90_ms:.2f} | {r.speedup:.2f}x | {lat.flops_bound:.2f}x |"
            )
    if report.stack is not None:
        lines += ["", *stack_markdown(report.stack)]
    env = report.environment
    lines += ["", f"Machine: {env.machine} ({env.cpu}, {describe_cpu_flags(env.cpu_flags)}, {env.cpus} cpus)"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()), ""]
    return "\n".join(lines)


def tokens_line(
    t: Tokens,
) -> str:
    """A tokens export's reduction and what it saves a language model."""
    return (
        f"block {t.feature_block} features, {t.reduction} patch tokens; LM prefill saved "
        f"{t.lm_prefill_flops_saved / 1e12:.3g} TFLOPs/image for {t.lm_params / 1e9:g}B params"
    )


def validation_lines(
    v: ValidationReport,
) -> list[str]:
    """The validation numbers as short lines (report.md and the CLI table share them)."""
    judged = f"{v.judged_images}/{v.images} images judged"
    errors = _error_text(v)
    if v.output in ("tokens", "dense"):
        what = "tokens" if v.output == "tokens" else "dense features"
        return [f"{what} ({judged}; cosine of the lowest row): {errors}", *_layer_lines(v)]
    lines = [f"top-1 agreement {v.top1_agreement:.4f} ({judged})", f"logits: {errors}"]
    lines += _layer_lines(v)
    agree = ", ".join(f"{k} {x:.3f}" for k, x in v.unpruned_top1_agreement.items())
    lines.append(f"top-1 agreement with the unpruned model: {agree}")
    if v.accuracy:
        lines.append("accuracy: " + ", ".join(f"{k} {x:.4f}" for k, x in v.accuracy.items()))
    return lines


def _error_text(
    v: ValidationReport,
) -> str:
    """Errors and cosine as the verdict used them: on the judged images, the all-image values beside
    them when images were left out (a near-tie makes those large by construction)."""
    mean = f"mean |err| {_g(v.mean_abs_error)}"
    if v.judged_images == v.images:
        return f"max |err| {_g(v.max_abs_error)}, {mean}, min cosine {_g6(v.min_cosine)}"
    max_err = f"max |err| {_g(v.max_abs_error_judged)} judged ({_g(v.max_abs_error)} over all images)"
    cosine = f"min cosine {_g6(v.min_cosine_judged)} judged ({_g6(v.min_cosine)} over all images)"
    return f"{max_err}, {mean} over all images, {cosine}"


def plan_line(
    plan: dict,
) -> str:
    """A report's plan in one line: where it prunes or merges, how much, the token counts."""
    if plan.get("tome") is not None:
        r, asked = plan["merge_counts"], plan["tome"]
        asked = asked if isinstance(asked, list) else [asked] * len(r)
        where = [i for i, n, a in zip(plan["layers"], r, asked) if n != a]
        clamped = f" (clamped to half the tokens at blocks {where})" if where else ""
        return f"ToMe at blocks {plan['layers']}, r {r}{clamped}, tokens {plan['token_steps']}"
    final = "" if plan.get("final_rate") is None else f", final keep {plan['final_rate']:g}"
    merge = ""
    if plan.get("merge") and plan.get("feature_block") is None:
        merge = f", dropped tokens merged by {plan.get('merge_weight') or 'size'}"
    return f"{plan['metric']} at blocks {plan['layers']}, keep {plan['keep_rates']}{final}{merge}, tokens {plan['token_steps']}"


# What a line calls each kind of operation's count; a select's needs no name ("select 60").
_COUNT_NAMES = {"prune": "keep", "merge": "keep", "tome": "merge"}


def operation_lines(
    operations: Sequence[Operation],
) -> list[str]:
    """One line per operation of a plan (``block 3: prune, keep 96``, ``block 5: tome, merge 8``,
    ``block 10: select 60``), or one saying there is none."""
    lines = []
    for op in operations:
        name = _COUNT_NAMES.get(op.kind)
        lines.append(f"block {op.layer}: {op.kind}" + (f", {name} {op.count}" if name else f" {op.count}"))
    return lines or ["none: every block passes the tokens through"]


def operations_markdown(
    operations: Sequence[Operation],
) -> list[str]:
    """report.md's operation lines: a nested list under one item."""
    if not operations:
        return [f"- Operations: {operation_lines(operations)[0]}"]
    return ["- Operations (the other blocks pass the tokens through):", *(f"  - {line}" for line in operation_lines(operations))]


def _layer_lines(
    v: ValidationReport,
) -> list[str]:
    lines = []
    for layer in v.layers:
        kept = "" if layer.identical_fraction is None else f", identical kept sets {layer.identical_fraction:.3f}"
        margin = "n/a" if _missing(layer.min_relative_margin) else f"{layer.min_relative_margin:.2g}"
        merge = "" if _missing(layer.min_merge_margin) else f", min merge margin {layer.min_merge_margin:.2g}"
        lines.append(f"layer {layer.layer} (k={layer.k}): min relative margin {margin}{kept}{merge}")
    return lines


def _missing(
    x: float | None,
) -> bool:
    """No number to show: not measured, or infinite (a layer that prunes nothing; report.json has null)."""
    return x is None or not math.isfinite(x)


def _g(
    x: float | None,
) -> str:
    return "n/a" if _missing(x) else f"{x:.3g}"


def _g6(
    x: float | None,
) -> str:
    return "n/a" if _missing(x) else f"{x:.6f}"


def print_bench(
    report: dict,
) -> None:
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
    if report.get("stack") is not None:
        from rich.markdown import Markdown

        console.print(Markdown("\n".join(stack_markdown(Stack.from_dict(report["stack"])))))
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    rounds = ", ".join(f"b={b} {r['pruned']['rounds']}" for b, r in report["batches"].items())
    load = " -> ".join(f"{x[0]:.2f}" for x in (env["loadavg_before"], env["loadavg_after"]) if x)
    console.print(
        f"{report['backend']} on {report['device']}, {Timing.from_dict(report).describe()} "
        f"(rounds timed: {rounds}), interleaved | "
        f"machine {env['machine']} ({env['cpu']}, {describe_cpu_flags(env.get('cpu_flags'))}, {env['cpus']} cpus, "
        f"load {load}) | {versions}",
        highlight=False,
    )


def series_label(
    metric: str,
    norm: float,
    norms: Sequence[float],
    precision: str = "fp32",
) -> str:
    """``Col-Ln (n=4)`` when several norm orders were swept, else just the metric; `` + merge`` for
    a series name ``<metric>+merge`` (:attr:`colln.measure.sweep.Row.series_name`); `` int8`` for
    quantized rows."""
    base = metric.removesuffix("+merge")
    label = METRIC_LABELS.get(base, base) + (" + merge" if base != metric else "")
    label = f"{label} (n={norm:g})" if base not in ("cls", "tome") and len(set(norms)) > 1 else label
    return label if precision == "fp32" else f"{label} {precision}"


def table_cells(
    result: Sweep,
    layers: tuple[int, ...],
) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """The paper-shaped tables for one layer set: header, accuracy rows and latency rows (rows are
    metrics, columns keep rates; cells ``top-1 % (agreement %)`` and ``ms (speedup)``, then the
    FLOPs ratio)."""
    header = ["metric", *(f"keep {k:g}" for k in result.keeps)]
    norms = [n for _, n, _ in result.series()]
    acc_rows, lat_rows = [], []
    for metric, norm, precision in result.series():
        cells = [result.find(metric, norm, k, layers, precision) for k in result.keeps]
        label = series_label(metric, norm, norms, precision)
        acc_rows.append([label, *(f"{100 * r.accuracy:.1f} ({100 * r.agreement:.1f})" if r else "-" for r in cells)])
        lat_rows.append([label, *(f"{r.latency.p50_ms:.3g} ({result.speedup(r):.2f}x)" if r else "-" for r in cells)])
    # The FLOPs ratio depends on keep and layers only, not on the metric: one row under the timings.
    any_row = [next((r for r in result.keep_rows if (r.keep, r.layers) == (k, layers)), None) for k in result.keeps]
    lat_rows.append(["FLOPs / unpruned", *(f"{r.flops_ratio:.2f}" if r else "-" for r in any_row)])
    return header, acc_rows, lat_rows


def tome_cells(
    result: Sweep,
) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """:func:`table_cells` for the ToMe rows: columns are r (merged at every block)."""
    rows = sorted(result.tome_rows, key=lambda r: (r.precision, r.r))
    header = ["ToMe", *(f"r={r.r}" + ("" if r.precision == "fp32" else f" {r.precision}") for r in rows)]
    acc = [["top-1 (agreement)", *(f"{100 * r.accuracy:.1f} ({100 * r.agreement:.1f})" for r in rows)]]
    lat = [
        ["ms (speedup)", *(f"{r.latency.p50_ms:.3g} ({result.speedup(r):.2f}x)" for r in rows)],
        ["FLOPs / unpruned", *(f"{r.flops_ratio:.2f}" for r in rows)],
    ]
    return header, acc, lat


def _tables(
    result: Sweep,
) -> list[tuple[str, list[str], list[list[str]], list[list[str]]]]:
    """(where, header, accuracy rows, latency rows): one per layer set, then ToMe's when swept."""
    tables = [(f"pruning at blocks {', '.join(map(str, layers))}", *table_cells(result, layers)) for layers in result.layer_sets]
    return tables + ([("ToMe at every block", *tome_cells(result))] if result.tome_rows else [])


def _md_table(
    header: list[str],
    rows: list[list[str]],
) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def describe(
    result: Sweep,
) -> str:
    """One line naming what was measured."""
    base = result.baseline
    timed = f"; timed {base.latency.rounds} rounds ({result.timing.describe()})" if result.timing is not None else ""
    return (
        f"{result.model} ({result.weights} weights) on {result.num_images} {result.data} images, "
        f"{result.backend} on {result.device}; "
        f"unpruned top-1 {100 * base.accuracy:.1f}%, {base.latency.p50_ms:.3g} ms median at batch {base.latency.batch}"
        f"{timed}"
    )


def eval_markdown(
    result: Sweep,
) -> str:
    """The results as markdown: per layer set, the accuracy table and the latency table."""
    parts = [f"# colln-eval: {result.model}", "", describe(result) + ".", ""]
    for where, header, acc, lat in _tables(result):
        parts += [f"## {where[:1].upper()}{where[1:]}", "", "Top-1 accuracy % (agreement with the unpruned model %):", ""]
        parts += [
            _md_table(header, acc),
            "",
            f"Median latency ms at batch {result.baseline.latency.batch} (speedup over unpruned: the median of the paired "
            "per-round ratios):",
            "",
        ]
        parts += [_md_table(header, lat), ""]
    if result.pick:
        parts += ["## Pick", "", f"{result.pick['why']}: `{result.pick['command']}`", ""]
    return "\n".join(parts)


def print_eval(
    result: Sweep,
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        # Piped output has no width to fit; rich would assume 80 columns and wrap every cell.
        console.width = max(console.width, 120)
    console.print(describe(result))
    for where, header, acc, lat in _tables(result):
        for title, rows in (
            (f"top-1 % (agreement %), {where}", acc),
            (f"median ms (speedup), {where.removeprefix('pruning at ')}", lat),
        ):
            table = Table(title=title)
            for i, h in enumerate(header):
                table.add_column(h, justify="left" if i == 0 else "right")
            for r in rows:
                table.add_row(*r)
            console.print(table)
