"""``colln-export MODEL --keep R``: prune a timm ViT with Col-Ln, export ONNX, validate it against
PyTorch, time it against the unpruned model, and write ``report.json`` / ``report.md``.

Exit codes: 0 ok, 1 validation failed (the export is still written, its report says why), 2 bad
input or a step that could not run (``colln: error: <stage>: ...``; nothing is written).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from colln.app.build_cli import add_engine_arguments
from colln.app.cli import (
    ArgumentParser,
    add_prune_arguments,
    add_timing_arguments,
    entry_point,
    parse_ints,
    prune_config,
    timing_options,
)
from colln.errors import UsageError
from colln.export.precisions import GRAPH_PRECISIONS, runs_on
from colln.export.spec import DEFAULT_OPSET, ExportSpec
from colln.jobs.export import (
    CalibrationOptions,
    EngineOptions,
    ExportOptions,
    LatencyOptions,
    OpenvinoOptions,
    Progress,
    TritonOptions,
    ValidationOptions,
    export_model,
)
from colln.report.export_report import DEFAULT_LM_PARAMS, REPORT_JSON
from colln.report.render import result_table
from colln.report.schema import ExportReport

if TYPE_CHECKING:
    from rich.console import Console


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="colln-export",
        description="Prune a timm Vision Transformer with Col-Ln token pruning and export it to ONNX, "
        "validated against PyTorch and timed against the unpruned model.",
    )
    p.add_argument("model", help="timm model name or alias (vit_base, deit_small, ...), or digits_vit (bundled)")
    add_prune_arguments(p)
    p.add_argument(
        "--weights", default=None, help="pretrained | random | PATH (default: bundled for digits_vit, pretrained otherwise)"
    )
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, 17..22 (default {DEFAULT_OPSET}: TensorRT 10/11 parse it)"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=GRAPH_PRECISIONS,
        help="fp16 writes a strongly typed fp16 graph (scores, TopK, softmax, LayerNorm stay fp32); int8 a static QDQ "
        "graph with int8 weight products (the token selection, softmax and LayerNorm stay float)",
    )
    p.add_argument(
        "--calib-images",
        type=Path,
        default=None,
        help="int8: directory of calibration images (default: the validation images)",
    )
    p.add_argument("--calib-limit", type=int, default=None, help="int8: calibrate on N images spread over the set (default: all)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default exports/<model>-<metric>-keep<R>)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out; export fine-tuned --weights with a plan other than the one they were trained for",
    )
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch validation")
    p.add_argument("--no-fail", action="store_true", help="report a failed validation but exit 0")
    p.add_argument(
        "--val-images",
        type=Path,
        default=None,
        help="directory of validation images (default: skimage photos; digits test split for digits_vit)",
    )
    p.add_argument("--val-limit", type=int, default=None, help="validate on N images spread evenly over the set (default: all)")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        metavar="POINTS",
        help="int8, with labelled validation images: the most top-1 accuracy int8 may lose against the fp32 pruned model, "
        "in points (default 0.5): validation fails beyond it, and OpenVINO's int8 IR is quantized with NNCF's accuracy "
        "control (what it ranks worst stays float until the drop holds)",
    )
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--latency-batches", default="1,8", help="batch sizes to time (default 1,8)")
    add_timing_arguments(p, rounds_aliases=("--latency-rounds",))
    p.add_argument(
        "--openvino",
        action="store_true",
        help="also write an OpenVINO IR (openvino/model.xml + .bin), validate it against PyTorch and time it beside "
        "ONNX Runtime (needs pip install 'colln[openvino]')",
    )
    p.add_argument(
        "--openvino-precision",
        default=None,
        choices=runs_on("openvino"),
        help="--openvino: fp32 or bf16 (OpenVINO's inference precision hint) for an fp32 export; int8 (NNCF, the token "
        "selection kept float, run at the f32 hint) or int8-bf16 (the same IR, what NNCF left float at the bf16 hint: "
        "OpenVINO's own default on CPUs with bf16) for an int8 one (default: the export's --precision)",
    )
    p.add_argument("--trt", action="store_true", help="also build a TensorRT engine (model.plan)")
    add_engine_arguments(p)
    p.add_argument(
        "--lm-params",
        type=float,
        default=DEFAULT_LM_PARAMS,
        help="--output tokens: parameters of the language model fed, for the prefill FLOPs saved (default 7e9)",
    )
    p.add_argument("--triton-repo", type=Path, default=None, help="also write a Triton model repository entry into DIR")
    p.add_argument(
        "--triton-backend",
        default="onnxruntime",
        choices=("onnxruntime", "openvino", "tensorrt"),
        help="Triton backend for --triton-repo (openvino needs --openvino; tensorrt needs --trt with full TensorRT)",
    )
    return p


def run(
    args: argparse.Namespace,
) -> int:
    from rich.console import Console

    spec = ExportSpec(
        model=args.model,
        weights=args.weights,
        img_size=args.img_size,
        pruning=prune_config(args),
        precision=args.precision,
        opset=args.opset,
    )
    latency = None
    if not args.no_latency:
        latency = LatencyOptions(
            batches=parse_ints(args.latency_batches, "--latency-batches", minimum=1), timing=timing_options(args)
        )
    engine = EngineOptions(args.batch_min, args.batch_opt, args.batch_max, args.timing_cache) if args.trt else None
    triton = TritonOptions(args.triton_repo, args.triton_backend, args.batch_max) if args.triton_repo is not None else None
    if args.openvino_precision is not None and not args.openvino:
        raise UsageError("--openvino-precision applies with --openvino only")
    openvino = OpenvinoOptions(args.openvino_precision) if args.openvino else None
    if args.triton_repo is not None and args.triton_backend == "openvino" and openvino is None:
        raise UsageError("--triton-backend openvino serves the OpenVINO IR: add --openvino")
    calibrated = args.calib_images is not None or args.calib_limit is not None
    calibration = CalibrationOptions(args.calib_images, args.calib_limit) if calibrated else None
    drop = args.max_accuracy_drop / 100 if args.max_accuracy_drop is not None else None
    if drop is not None and args.no_validate:
        raise UsageError("--max-accuracy-drop is judged on the validation images: drop --no-validate")
    console = Console(stderr=True)
    with _progress(console) as step:
        options = ExportOptions(
            force=args.force,
            validation=None if args.no_validate else ValidationOptions(args.val_images, args.val_limit, drop),
            latency=latency,
            engine=engine,
            triton=triton,
            calibration=calibration,
            openvino=openvino,
            lm_params=args.lm_params,
        )
        result = export_model(spec, args.out, options, progress=step)
    Console().print(result_table(ExportReport.from_dict(result.report), result.out, result.extra))
    for line in result.warnings:
        console.print(f"[yellow]{line}[/]")
    for checked in result.validations:
        for line in checked.warnings:
            console.print(f"[yellow]warning:[/] {checked.backend}: {line}")
        for line in checked.mismatches:
            console.print(f"[red]mismatch:[/] {checked.backend}: {line}")
    if not args.no_fail:
        for checked in result.validations:
            checked.raise_if_failed(result.out / REPORT_JSON)
    return 0


@contextlib.contextmanager
def _progress(
    console: Console,
) -> Iterator[Progress]:
    """A rich progress display; yields ``step(text)``, a context manager that shows one step."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(finished_text="[green]done"), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:

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


main = entry_point(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
