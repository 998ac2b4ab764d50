"""``colln-export MODEL --keep R``: prune a timm ViT with Col-Ln, export ONNX, validate it against
PyTorch, time it against the unpruned model, and write ``report.json`` / ``report.md``.

Exit codes: 0 ok, 1 validation failed (the export is still written, its report says why), 2 bad
input or a step that could not run (``colln: error: <stage>: ...``; nothing is written).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from colln.app.cli import ArgumentParser, parse_floats, parse_ints, run_main
from colln.export.build_cli import add_engine_arguments
from colln.export.spec import DEFAULT_OPSET, ONNX_FILE, ExportSpec
from colln.models.config import METRICS

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from colln.export.pipeline import Exported
    from colln.runtime.validate import ValidationReport

Step = Callable[[str], contextlib.AbstractContextManager[None]]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="colln-export",
        description="Prune a timm Vision Transformer with Col-Ln token pruning and export it to ONNX, "
        "validated against PyTorch and timed against the unpruned model.",
    )
    p.add_argument("model", help="timm model name or alias (vit_base, deit_small, ...), or digits_vit (bundled)")
    p.add_argument("--keep", default="0.7", help="keep rate in (0, 1], or one per pruning layer (0.8,0.7,0.6); 1.0 = unpruned baseline (default 0.7)")
    p.add_argument("--layers", default=None, help="pruning blocks, e.g. 3,6,9 (default: EViT's 3,6,9 of 12, scaled to the depth)")
    p.add_argument("--metric", default="colln", choices=METRICS, help="token score: colln (default), cls, correct ([CLS] + Col-Ln rescue)")
    p.add_argument("--norm", type=float, default=4.0, help="Col-Ln norm order n (default 4)")
    p.add_argument("--rescue", type=float, default=0.2, help="rescue ratio c for --metric correct (default 0.2)")
    p.add_argument("--fuse", action="store_true", help="fuse the pruned tokens into one extra token (EViT)")
    p.add_argument("--spatial-order", action="store_true", help="keep the kept tokens in spatial order (default: score order)")
    p.add_argument("--round-to", type=int, default=1, help="round keep counts up to a multiple of this, e.g. 8 (default 1: exact ceil(keep * N))")
    p.add_argument("--weights", default=None, help="pretrained | random | PATH (default: bundled for digits_vit, pretrained otherwise)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, 17..22 (default {DEFAULT_OPSET}: TensorRT 10/11 parse it)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="fp16 writes a strongly typed fp16 graph (scores, TopK, softmax, LayerNorm stay fp32)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default exports/<model>-<metric>-keep<R>)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch validation")
    p.add_argument("--no-fail", action="store_true", help="report a failed validation but exit 0")
    p.add_argument("--val-images", type=Path, default=None, help="directory of validation images (default: skimage photos; digits test split for digits_vit)")
    p.add_argument("--val-limit", type=int, default=None, help="validate on the first N images only (default: all)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--latency-batches", default="1,8", help="batch sizes to time (default 1,8)")
    p.add_argument("--latency-rounds", type=int, default=None, help="interleaved timing rounds per batch size (default: as many as fit in ~20 s, 5..50)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for timing (default: its own)")
    p.add_argument("--trt", action="store_true", help="also build a TensorRT engine (model.plan)")
    add_engine_arguments(p)
    p.add_argument("--triton-repo", type=Path, default=None, help="also write a Triton model repository entry into DIR")
    p.add_argument(
        "--triton-backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"), help="Triton backend for --triton-repo (tensorrt needs --trt with full TensorRT)"
    )
    p.add_argument("--verbose", action="store_true", help="show tracebacks")
    return p


def spec_from_args(
    args: argparse.Namespace,
) -> ExportSpec:
    keep = parse_floats(args.keep, "--keep")
    layers = parse_ints(args.layers, "--layers") if args.layers is not None else None
    return ExportSpec(
        model=args.model,
        weights=args.weights,
        img_size=args.img_size,
        keep=keep[0] if len(keep) == 1 else keep,
        layers=layers,
        metric=args.metric,
        norm=args.norm,
        rescue=args.rescue,
        fuse=args.fuse,
        spatial_order=args.spatial_order,
        round_to=args.round_to,
        precision=args.precision,
        opset=args.opset,
    )


def main(
    argv: Sequence[str] | None = None,
) -> int:
    return run_main(export_command, build_parser(), argv)


def export_command(
    args: argparse.Namespace,
) -> int:
    from rich.console import Console

    from colln.export.pipeline import atomic_output, default_out_dir
    from colln.models.registry import resolve_name

    spec = spec_from_args(args)
    batches = parse_ints(args.latency_batches, "--latency-batches")
    resolve_name(spec.model)  # an unknown name fails before anything is created
    if args.trt:
        from colln.export.tensorrt import check_profile, trt_module

        # Without TensorRT, or with a bad profile, fail now rather than after the export.
        check_profile(args.batch_min, args.batch_opt, args.batch_max)
        trt_module()
    out = args.out if args.out is not None else default_out_dir(spec)
    console = Console(stderr=True)
    extra: list[tuple[str, str]] = []
    with _progress(console) as step, atomic_output(out, args.force) as tmp:
        exported, validation, report = export_and_check(spec, tmp, args, batches, step)
        if args.trt and (validation is None or validation.passed):
            from colln.export.tensorrt import build_engine

            with step("building the TensorRT engine"):
                plan = build_engine(tmp, args.batch_min, args.batch_opt, args.batch_max, args.timing_cache)
            extra.append(("TensorRT", f"{out / plan.name} (batch {args.batch_min}/{args.batch_opt}/{args.batch_max})"))
    if args.triton_repo is not None and (validation is None or validation.passed):
        from colln.runtime.triton import write_model_repository

        model_dir = write_model_repository(out, args.triton_repo, backend=args.triton_backend, max_batch=args.batch_max)
        extra.append(("Triton", f"{model_dir} ({args.triton_backend})"))
    Console().print(result_table(report, out, extra))
    if validation is not None:
        for line in validation.warnings:
            console.print(f"[yellow]warning:[/] {line}")
        for line in validation.mismatches:
            console.print(f"[red]mismatch:[/] {line}")
        if not args.no_fail:
            validation.raise_if_failed(out / "report.json")
    return 0


def export_and_check(
    spec: ExportSpec,
    directory: Path,
    args: argparse.Namespace,
    batches: Sequence[int],
    step: Step,
) -> tuple[Exported, ValidationReport | None, dict]:
    """Export into ``directory``, validate, time against the unpruned export; write the reports."""
    from colln.data import data_config
    from colln.export.pipeline import export_into
    from colln.export.report import build_report, measure_latency, write_report
    from colln.models.registry import default_weights
    from colln.runtime.validate import candidate_runner, validate, validation_images

    with step(f"loading {spec.model} ({spec.weights or default_weights(spec.model)} weights)"):
        unpruned = spec.load_unpruned()
    with step("pruning and exporting to ONNX"):
        exported = export_into(spec, directory, unpruned)
    validation = None
    if not args.no_validate:
        with step("validating ONNX Runtime against PyTorch"):
            images = validation_images(spec.model, unpruned, args.val_images, args.val_limit)
            runner = candidate_runner(directory, "onnxruntime", exported.plan)
            validation = validate(exported.pruned, unpruned, runner, images, spec.precision, backend="onnxruntime")
    latency = None
    if not args.no_latency:
        with _unpruned_onnx(exported, step) as baseline, step("timing pruned vs unpruned (ONNX Runtime, interleaved)"):
            input_size = tuple(data_config(unpruned)["input_size"])
            latency = measure_latency(directory / ONNX_FILE, baseline, input_size, batches, args.latency_rounds, threads=args.threads)
    report = build_report(exported, validation, latency)
    write_report(directory, report)
    return exported, validation, report


@contextlib.contextmanager
def _unpruned_onnx(
    exported: Exported,
    step: Step,
) -> Iterator[Path]:
    """The unpruned counterpart's graph for timing: the export itself at keep 1.0, else a temporary
    export of ``spec.unpruned()`` from the same loaded weights."""
    from colln.export.pipeline import export_into
    from colln.runtime.validate import pruned_layers

    if not pruned_layers(exported.plan):
        yield exported.directory / ONNX_FILE
        return
    with tempfile.TemporaryDirectory(prefix="colln-unpruned-") as tmp:
        with step("exporting the unpruned baseline"):
            export_into(exported.spec.unpruned(), Path(tmp), exported.unpruned)
        yield Path(tmp) / ONNX_FILE


@contextlib.contextmanager
def _progress(
    console: Console,
) -> Iterator[Step]:
    """A rich progress display; yields ``step(text)``, a context manager that shows one step."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(finished_text="[green]done"), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as progress:

        @contextlib.contextmanager
        def step(text: str) -> Iterator[None]:
            task = progress.add_task(text, total=1)
            try:
                yield
            except BaseException:
                # The error line names the failed stage; a frozen spinner would only add noise.
                progress.remove_task(task)
                raise
            progress.update(task, completed=1)

        yield step


def result_table(
    report: dict,
    out: Path,
    extra: Sequence[tuple[str, str]] = (),
) -> Table:
    """The result as a two-column rich table."""
    from rich.table import Table

    from colln.export.report import validation_lines
    from colln.models.plan import KeepPlan

    m, e, plan, f = report["model"], report["export"], report["plan"], report["flops"]
    table = Table(title=f"colln-export {m['name']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    keep_plan = KeepPlan.from_dict({k: v for k, v in plan.items() if k != "summary"})
    tokens = " -> ".join(str(n) for n in [plan["tokens_in"][0], *[keep_plan.tokens_after(i) for i in plan["layers"]]])
    table.add_row("model", f"{m['name']} ({m['weights']} weights, {m['params'] / 1e6:.2f}M params, input {tuple(m['input_size'])})")
    table.add_row("plan", f"{plan['metric']} at blocks {plan['layers']}, keep {plan['keep_rates']}, tokens {tokens}")
    table.add_row("TopK K", ", ".join(str(k) for k in e["topk_k"]) or "none (unpruned)")
    table.add_row("FLOPs", f"{f['pruned'] / 1e9:.3g} G of {f['full'] / 1e9:.3g} G ({f['ratio']:.2f}x), bound {f['bound']:.2f}x")
    table.add_row("ONNX", f"{out / e['onnx']} ({e['onnx_bytes'] / 1e6:.1f} MB, opset {e['opset']}, {e['precision']})")
    v = report["validation"]
    if v is not None:
        verdict = "[green]passed[/]" if v["passed"] else "[red]FAILED[/]"
        table.add_row("validation", f"{verdict}: {v['backend']} vs torch on {v['images']} images ({v['source']})")
        for line in validation_lines(v):
            table.add_row("", line)
    lat = report["latency"]
    if lat is not None:
        for b, r in lat["batches"].items():
            table.add_row(
                f"latency b={b}",
                f"pruned {r['pruned']['p50_ms']:.2f} ms / unpruned {r['unpruned']['p50_ms']:.2f} ms (p50), "
                f"speedup {r['speedup']:.2f}x (bound {lat['flops_bound']:.2f}x)",
            )
    for row in extra:
        table.add_row(*row)
    table.add_row("output", str(out))
    return table


if __name__ == "__main__":
    sys.exit(main())
