"""The jobs as Python calls: :func:`export_model` prunes, exports, validates, times, writes the
report and optionally builds a TensorRT engine and a Triton repository entry (:func:`colln.jobs.evaluate.evaluate`
sweeps keep schedules). The commands only parse their arguments into these calls and render the
result (validation and benchmarks are :func:`colln.verify.validate.validate_export` and
:func:`colln.measure.bench.bench_export`).

    import colln
    result = colln.export_model(colln.ExportSpec("digits_vit", pruning=colln.PruneConfig(keep=0.7)), "out/")
    result.validation.passed, result.report["latency"]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from colln.data import ValImages, validation_images
from colln.errors import CalibrationError, DataError, UsageError
from colln.export.artifact import default_out_dir, export_into
from colln.export.quantize import RECIPE as INT8_RECIPE
from colln.export.spec import ONNX_FILE, SPEC_FILE, ExportSpec
from colln.export.unpruned import cached_export, default_cache, unpruned_export
from colln.files import atomic_dir
from colln.infer.timing import Timing
from colln.measure.bench import stack_accuracy, stack_exports, stack_runtimes, time_variants
from colln.models.registry import default_weights, resolve_name
from colln.report.export_report import DEFAULT_LM_PARAMS, build_report, write_report
from colln.report.schema import Calibration, Latency, Openvino, OpenvinoArtifact, Stack, StackAccuracy
from colln.train.checkpoint import check_recorded_plan
from colln.verify.validate import ValidationReport, validate_backend

# A step's description in, a context manager around the step out (the CLI shows a spinner).
Progress = Callable[[str], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def _quiet(text: str) -> Iterator[None]:
    yield


@dataclass(frozen=True)
class ValidationOptions:
    """ONNX Runtime against the pruned PyTorch model on ``images`` (``None``: the model's default
    set, see :func:`colln.data.validation_images`), ``limit`` of them (:func:`colln.data.pick`). ``max_accuracy_drop``
    (int8, where the images have labels): the most top-1 accuracy (a fraction) int8 may lose against
    the fp32 pruned model, the validation's gate and NNCF's accuracy control for an OpenVINO int8 IR
    (None: :data:`colln.export.quantize.DEFAULT_MAX_ACCURACY_DROP`)."""

    images: Path | None = None
    limit: int | None = None
    max_accuracy_drop: float | None = None


@dataclass(frozen=True)
class CalibrationOptions:
    """int8 calibration on ``images`` (``None``: the model's validation images, see
    :func:`colln.data.validation_images`), ``limit`` of them (:func:`colln.data.pick`)."""

    images: Path | None = None
    limit: int | None = None


@dataclass(frozen=True)
class LatencyOptions:
    """Pruned against unpruned ONNX Runtime (or the variant stack), interleaved, at ``batches``,
    timed as ``timing`` says (:class:`colln.infer.timing.Timing`: colln-bench's and colln-eval's
    defaults too)."""

    batches: Sequence[int] = (1, 8)
    timing: Timing = field(default_factory=Timing)


@dataclass(frozen=True)
class OpenvinoOptions:
    """An OpenVINO IR beside ``model.onnx`` (:mod:`colln.export.openvino`), validated against
    PyTorch like the ONNX graph and timed in the export's variant stack. ``precision``: ``fp32``,
    ``bf16`` (an fp32 export), ``int8`` or ``int8-bf16`` (an int8 export: NNCF on the same
    calibration images, what it left float run at OpenVINO's f32 or bf16 hint); ``None``: the export's."""

    precision: str | None = None

    def resolve(
        self,
        spec: ExportSpec,
    ) -> str:
        """The IR's precision for ``spec``; a UsageError when the two do not go together."""
        from colln.export.precisions import VOCABULARY, runs_on

        precision = self.precision or spec.precision
        if self.precision is None and precision not in runs_on("openvino"):
            raise UsageError(
                f"--openvino takes an fp32 or int8 export, not --precision {precision}: export fp32 (with "
                "--openvino-precision bf16 for 16-bit on OpenVINO) or int8"
            )
        if precision not in runs_on("openvino") or VOCABULARY[precision].graph != spec.precision:
            raise UsageError(
                f"--openvino-precision {precision} does not go with --precision {spec.precision}: OpenVINO runs fp32 or bf16 "
                "from an fp32 export and int8 or int8-bf16 from an int8 export"
            )
        if precision == "bf16" and (spec.pruning.merge or spec.pruning.tome is not None):
            # As in fp16 (colln.export.artifact.export_into), bf16's 8-bit mantissa flips near-tied merge
            # choices: digits_vit --tome 8 at bf16 had a near-tied merge on all 450 images (none judgeable;
            # over all of them min cosine 0.92, max |logit error| 1.16).
            what = "--tome" if spec.pruning.tome is not None else "--merge"
            raise UsageError(f"{what} needs --openvino-precision fp32: at bf16, rounding flips which token absorbs a merged one")
        return precision


@dataclass(frozen=True)
class EngineOptions:
    """A TensorRT engine with one batch profile (see :func:`colln.export.tensorrt.build_engine`)."""

    batch_min: int = 1
    batch_opt: int = 8
    batch_max: int = 32
    timing_cache: Path | None = None


@dataclass(frozen=True)
class TritonOptions:
    """A Triton model repository entry in ``repo`` served by ``backend``."""

    repo: Path
    backend: str = "onnxruntime"
    max_batch: int = 32


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote. ``validation`` is None when skipped; a failed validation
    still writes the export (``passed`` is False, the report lists every mismatch)."""

    out: Path
    report: dict
    validation: ValidationReport | None
    extra: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # OpenVINO's validation against PyTorch (--openvino); None when not asked for or skipped.
    openvino: ValidationReport | None = None

    @property
    def validations(self) -> list[ValidationReport]:
        return [v for v in (self.validation, self.openvino) if v is not None]

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.validations)


def export_model(
    spec: ExportSpec,
    out: Path | None = None,
    *,
    force: bool = False,
    validation: ValidationOptions | None = ValidationOptions(),
    latency: LatencyOptions | None = LatencyOptions(),
    engine: EngineOptions | None = None,
    triton: TritonOptions | None = None,
    calibration: CalibrationOptions | None = None,
    progress: Progress = _quiet,
    lm_params: float = DEFAULT_LM_PARAMS,
    openvino: OpenvinoOptions | None = None,
) -> ExportResult:
    """Prune and export ``spec`` into ``out`` (default ``exports/<model>-<metric>-keep<R>``), written
    in a temp dir renamed into place at the end: a failure leaves ``out`` as it was. ``None`` for
    ``validation`` / ``latency`` skips that step. The engine and the Triton entry are built only
    when validation passed (or was skipped). ``lm_params``: the language model a tokens export
    feeds (the report gives the prefill FLOPs it saves). ``calibration`` applies to int8 only
    (``None``: the defaults of :class:`CalibrationOptions`); an int8 export is timed in its stack
    (unpruned and pruned, fp32 and int8, one interleaved run: the report's ``stack``).
    ``openvino`` also writes, validates and times an OpenVINO IR (:class:`OpenvinoOptions`; the
    stack then holds both runtimes; ``report["openvino"]``).

    Weights fine-tuned by ``colln-finetune`` carry their plan in ``finetune.json``: an export with
    another plan is refused, or with ``force`` made with a warning (in ``ExportResult.warnings``)."""
    resolve_name(spec.model)  # an unknown name fails before anything is created
    if calibration is not None and spec.precision != "int8":
        raise UsageError(f"calibration images apply to --precision int8 only, not {spec.precision}")
    if calibration is not None and calibration.limit is not None and calibration.limit < 1:
        raise UsageError(f"--calib-limit must be >= 1, got {calibration.limit}")
    drop = validation.max_accuracy_drop if validation is not None else None
    if drop is not None and (spec.precision != "int8" or not 0 <= drop < 1):
        raise UsageError(
            f"--max-accuracy-drop applies to --precision int8 only, from 0 to 100 points (got {100 * drop:g} at {spec.precision})"
        )
    warnings = []
    if spec.weights is not None and Path(spec.weights).is_file():
        mismatch = check_recorded_plan(Path(spec.weights), spec.pruning, force=force)
        warnings += [mismatch] if mismatch else []
    if engine is not None:
        from colln.export.tensorrt import check_profile, trt_module

        # Without TensorRT, or with a bad profile, fail now rather than after the export.
        check_profile(engine.batch_min, engine.batch_opt, engine.batch_max)
        trt_module()
    ov_precision = None
    if openvino is not None:
        from colln.export.openvino import nncf_module, ov_module

        # Without the extra, or with a precision that does not fit, fail before anything is written.
        ov_precision = openvino.resolve(spec)
        ov_module()
        if spec.precision == "int8":
            nncf_module()
    out = Path(out) if out is not None else default_out_dir(spec)
    extra: list[tuple[str, str]] = []
    with atomic_dir(out, force, marker=SPEC_FILE) as tmp:
        with progress(f"loading {spec.model} ({spec.weights or default_weights(spec.model)} weights)"):
            unpruned = spec.load_unpruned()
        calib = None
        if spec.precision == "int8":
            options = calibration or CalibrationOptions()
            with progress(f"loading the calibration images ({options.images or 'validation images'})"):
                calib = _calibration_images(spec, unpruned, options)
        with progress("pruning and exporting to ONNX" + (" (int8: calibrating)" if calib else "")):
            exported = export_into(spec, tmp, unpruned, calib.images if calib else None)
        checked = images = None
        if validation is not None:
            with progress("validating ONNX Runtime against PyTorch"):
                images = validation_images(spec.model, unpruned, validation.images, validation.limit)
                checked = validate_backend(tmp, "onnxruntime", exported.pruned, unpruned, images, max_accuracy_drop=drop)
        ov_checked = ov_record = None
        if openvino is not None:
            from colln.export.openvino import write_ir

            source = None
            if spec.precision == "int8":
                with progress("exporting the pruned fp32 counterpart (cached)"):
                    source = cached_export(replace(exported.spec, precision="fp32", plan={}), default_cache(out), unpruned)
            # Labelled validation images: NNCF's accuracy control holds int8's drop (today's recipe without labels).
            labelled = (images.images, images.labels) if source and images is not None and images.labels is not None else None
            what = ", NNCF with accuracy control)" if labelled else ", NNCF calibrating)" if source else ")"
            with progress(f"writing the OpenVINO IR ({ov_precision}{what}"):
                exported = replace(
                    exported,
                    spec=write_ir(
                        tmp,
                        ov_precision,
                        calib.images if calib else None,
                        source / ONNX_FILE if source else None,
                        validation=labelled,
                        max_accuracy_drop=drop,
                    ),
                )
                ov_record = exported.spec.artifacts["openvino"]
            if validation is not None:
                with progress("validating OpenVINO against PyTorch"):
                    ov_checked = validate_backend(tmp, "openvino", exported.pruned, unpruned, images, max_accuracy_drop=drop)
        runtimes = stack_runtimes(spec.precision, runtimes=("onnxruntime", "openvino") if openvino is not None else ())
        timing = stack = None
        if latency is not None and runtimes is not None:
            # The unpruned int8 counterpart sees the same calibration set (the default one is cached as such).
            custom = calibration is not None and calibration != CalibrationOptions()
            with progress("exporting the fp32 and unpruned counterparts (cached)"):
                exports = stack_exports(
                    exported.spec, tmp, default_cache(out), unpruned, calib.images if custom else None, runtimes
                )
            with progress(f"timing the variant stack ({', '.join(runtimes)}, interleaved)"):
                # The report names the export's files where they will be: in out, once tmp is renamed.
                timing, stack = _latency(exports, latency, exported.plan.flops().bound, spec.precision, {tmp: out})
            with progress("top-1 of every stack variant"):
                images = images if images is not None else validation_images(spec.model, unpruned)
                stack = replace(stack, accuracy=StackAccuracy.from_dict(stack_accuracy(exports, images, latency.timing.threads)))
        elif latency is not None:
            with progress("exporting the unpruned baseline (cached)"):
                base_dir = unpruned_export(exported.spec, default_cache(out), unpruned)
            with progress("timing pruned vs unpruned (ONNX Runtime, interleaved)"):
                timing, _ = _latency({"unpruned": base_dir, "pruned": tmp}, latency, exported.plan.flops().bound)
        record = None
        if calib is not None:
            record = Calibration(method="minmax", source=calib.source, images=len(calib.images), recipe=INT8_RECIPE)
        ov_section = None
        if openvino is not None:
            ov_section = Openvino(artifact=OpenvinoArtifact.from_dict(ov_record), validation=ov_checked)
        report = build_report(exported, checked, timing, lm_params, stack=stack, calibration=record, openvino=ov_section)
        write_report(tmp, report)
        passed = all(v is None or v.passed for v in (checked, ov_checked))
        if engine is not None and passed:
            from colln.export.tensorrt import build_engine

            with progress("building the TensorRT engine"):
                plan = build_engine(tmp, engine.batch_min, engine.batch_opt, engine.batch_max, engine.timing_cache)
            extra.append(("TensorRT", f"{out / plan.name} (batch {engine.batch_min}/{engine.batch_opt}/{engine.batch_max})"))
    if triton is not None and passed:
        from colln.export.triton import write_model_repository

        model_dir = write_model_repository(out, triton.repo, backend=triton.backend, max_batch=triton.max_batch)
        extra.append(("Triton", f"{model_dir} ({triton.backend})"))
    return ExportResult(out=out, report=report.to_dict(), validation=checked, extra=extra, warnings=warnings, openvino=ov_checked)


def _latency(
    exports: dict,
    options: LatencyOptions,
    bound: float,
    precision: str = "fp32",
    renamed: dict[Path, Path] | None = None,
) -> tuple[Latency, Stack | None]:
    """The report's latency section (pruned against unpruned; for an int8 stack, pruned int8
    against unpruned int8) and its ``stack`` (``None`` for a pair), from one interleaved ONNX
    Runtime run of ``exports``: :func:`colln.measure.bench.time_variants`, as colln-bench times
    (``renamed``: the temp dirs the stack's artifacts are named by their final directory)."""
    timed = time_variants(exports, options.batches, options.timing, bound, precision, renamed=renamed)
    stack = Stack.from_dict(timed.stack) if timed.stack is not None else None
    return Latency.of(options.timing, timed.rows, bound), stack


def _calibration_images(
    spec: ExportSpec,
    unpruned: nn.Module,
    options: CalibrationOptions,
) -> ValImages:
    """The preprocessed calibration set; an empty or unreadable one is a CalibrationError."""
    try:
        return validation_images(spec.model, unpruned, options.images, options.limit)
    except DataError as exc:
        raise CalibrationError(f"--calib-images: {exc}") from exc
