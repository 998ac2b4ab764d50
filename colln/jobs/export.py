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
from colln.export.artifact import Exported, default_out_dir, export_into
from colln.export.quantize import RECIPE as INT8_RECIPE
from colln.export.spec import ONNX_FILE, SPEC_FILE, ExportSpec
from colln.export.unpruned import cached_export, default_cache, unpruned_export
from colln.files import atomic_dir
from colln.infer.timing import Timing
from colln.measure.bench import stack_accuracy, stack_exports, stack_runtimes, time_variants
from colln.models.registry import default_weights, resolve_name
from colln.report.export_report import DEFAULT_LM_PARAMS, build_report, write_report
from colln.report.schema import Calibration, ExportReport, Latency, Openvino, OpenvinoArtifact, Stack, StackAccuracy
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


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export_model` does besides the export, built once by the caller. ``None`` for
    ``validation`` / ``latency`` skips that step; ``engine``, ``triton``, ``calibration`` and
    ``openvino`` are off at ``None``. The engine and the Triton entry are built only when validation
    passed (or was skipped). ``calibration`` applies to int8 only (``None``: the defaults of
    :class:`CalibrationOptions`); an int8 export is timed in its stack (unpruned and pruned, fp32
    and int8, one interleaved run: the report's ``stack``). ``openvino`` also writes, validates and
    times an OpenVINO IR (:class:`OpenvinoOptions`; the stack then holds both runtimes;
    ``report["openvino"]``). ``lm_params``: the language model a tokens export feeds (the report
    gives the prefill FLOPs it saves).
    ``force`` replaces an existing ``out`` and exports fine-tuned weights with another plan than
    their recorded one (with a warning)."""

    force: bool = False
    validation: ValidationOptions | None = field(default_factory=ValidationOptions)
    latency: LatencyOptions | None = field(default_factory=LatencyOptions)
    engine: EngineOptions | None = None
    triton: TritonOptions | None = None
    calibration: CalibrationOptions | None = None
    openvino: OpenvinoOptions | None = None
    lm_params: float = DEFAULT_LM_PARAMS


def export_model(
    spec: ExportSpec,
    out: Path | None = None,
    options: ExportOptions | None = None,
    *,
    progress: Progress = _quiet,
) -> ExportResult:
    """Prune and export ``spec`` into ``out`` (default ``exports/<model>-<metric>-keep<R>``), written
    in a temp dir renamed into place at the end: a failure leaves ``out`` as it was; then validate,
    time, write the report and build what ``options`` asks for (:class:`ExportOptions`; ``None``:
    its defaults). ``progress`` wraps each step (the CLI shows a spinner).

    Weights fine-tuned by ``colln-finetune`` carry their plan in ``finetune.json``: an export with
    another plan is refused, or with ``options.force`` made with a warning (in ``ExportResult.warnings``)."""
    o = options or ExportOptions()
    drop = _check_options(spec, o.validation, o.calibration)
    warnings = _plan_warnings(spec, o.force)
    _check_engine(o.engine)
    ov_precision = _check_openvino(spec, o.openvino)
    out = Path(out) if out is not None else default_out_dir(spec)
    with atomic_dir(out, o.force, marker=SPEC_FILE) as tmp:
        work = _prune_and_export(spec, out, tmp, o.calibration, progress)
        checked, images = _validate(work, "onnxruntime", o.validation, None, drop)
        ov_checked = ov_record = None
        if ov_precision is not None:
            work, ov_record = _write_openvino(work, ov_precision, images, drop)
            ov_checked, _ = _validate(work, "openvino", o.validation, images, drop)
        timing, stack = _time(work, o.latency, o.calibration, o.openvino is not None, images)
        report = _write_report(work, checked, timing, stack, o.lm_params, ov_record, ov_checked)
        passed = all(v is None or v.passed for v in (checked, ov_checked))
        extra = _build_engine(work, o.engine) if o.engine is not None and passed else []
    if o.triton is not None and passed:
        extra = [*extra, _triton_entry(out, o.triton)]
    return ExportResult(out=out, report=report.to_dict(), validation=checked, extra=extra, warnings=warnings, openvino=ov_checked)


@dataclass(frozen=True)
class _Work:
    """An export under way: ``exported`` written in ``tmp``, renamed to ``out`` at the end, from
    ``unpruned`` (int8: calibrated on ``calib``); ``progress`` wraps each step."""

    spec: ExportSpec
    out: Path
    tmp: Path
    unpruned: nn.Module
    calib: ValImages | None
    exported: Exported
    progress: Progress


def _check_options(
    spec: ExportSpec,
    validation: ValidationOptions | None,
    calibration: CalibrationOptions | None,
) -> float | None:
    """The validation's int8 accuracy-drop gate (``None``: the default or no validation); a
    UsageError for an unknown model or options that do not go with ``spec``, before anything is created."""
    resolve_name(spec.model)
    if calibration is not None and spec.precision != "int8":
        raise UsageError(f"calibration images apply to --precision int8 only, not {spec.precision}")
    if calibration is not None and calibration.limit is not None and calibration.limit < 1:
        raise UsageError(f"--calib-limit must be >= 1, got {calibration.limit}")
    drop = validation.max_accuracy_drop if validation is not None else None
    if drop is not None and (spec.precision != "int8" or not 0 <= drop < 1):
        raise UsageError(
            f"--max-accuracy-drop applies to --precision int8 only, from 0 to 100 points (got {100 * drop:g} at {spec.precision})"
        )
    return drop


def _plan_warnings(
    spec: ExportSpec,
    force: bool,
) -> list[str]:
    """The warning (with ``force``) for fine-tuned weights whose recorded plan differs from ``spec``'s."""
    if spec.weights is None or not Path(spec.weights).is_file():
        return []
    mismatch = check_recorded_plan(Path(spec.weights), spec.pruning, force=force)
    return [mismatch] if mismatch else []


def _check_engine(
    engine: EngineOptions | None,
) -> None:
    """Without TensorRT, or with a bad profile, fail now rather than after the export."""
    if engine is None:
        return
    from colln.export.tensorrt import check_profile, trt_module

    check_profile(engine.batch_min, engine.batch_opt, engine.batch_max)
    trt_module()


def _check_openvino(
    spec: ExportSpec,
    openvino: OpenvinoOptions | None,
) -> str | None:
    """The IR's precision (``None``: no IR); without the extra, or with a precision that does not
    fit, fail before anything is written."""
    if openvino is None:
        return None
    from colln.export.openvino import nncf_module, ov_module

    precision = openvino.resolve(spec)
    ov_module()
    if spec.precision == "int8":
        nncf_module()
    return precision


def _prune_and_export(
    spec: ExportSpec,
    out: Path,
    tmp: Path,
    calibration: CalibrationOptions | None,
    progress: Progress,
) -> _Work:
    """Load the unpruned model, (int8) its calibration images, and export the pruned graph into ``tmp``."""
    with progress(f"loading {spec.model} ({spec.weights or default_weights(spec.model)} weights)"):
        unpruned = spec.load_unpruned()
    calib = None
    if spec.precision == "int8":
        options = calibration or CalibrationOptions()
        with progress(f"loading the calibration images ({options.images or 'validation images'})"):
            calib = _calibration_images(spec, unpruned, options)
    with progress("pruning and exporting to ONNX" + (" (int8: calibrating)" if calib else "")):
        exported = export_into(spec, tmp, unpruned, calib.images if calib else None)
    return _Work(spec, out, tmp, unpruned, calib, exported, progress)


def _validate(
    work: _Work,
    backend: str,
    validation: ValidationOptions | None,
    images: ValImages | None,
    drop: float | None,
) -> tuple[ValidationReport | None, ValImages | None]:
    """``backend`` against the pruned PyTorch model on ``images`` (``None``: those ``validation``
    names), and those images; ``(None, None)`` when ``validation`` is None."""
    if validation is None:
        return None, None
    names = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
    with work.progress(f"validating {names[backend]} against PyTorch"):
        if images is None:
            images = validation_images(work.spec.model, work.unpruned, validation.images, validation.limit)
        checked = validate_backend(work.tmp, backend, work.exported.pruned, work.unpruned, images, max_accuracy_drop=drop)
    return checked, images


def _write_openvino(
    work: _Work,
    precision: str,
    images: ValImages | None,
    drop: float | None,
) -> tuple[_Work, dict]:
    """Write the OpenVINO IR at ``precision`` beside the ONNX graph: the work with the IR in its
    spec, and the IR's artifact record. An int8 IR is NNCF on the cached pruned fp32 counterpart."""
    from colln.export.openvino import write_ir

    source = None
    if work.spec.precision == "int8":
        with work.progress("exporting the pruned fp32 counterpart (cached)"):
            counterpart = replace(work.exported.spec, precision="fp32", plan_record={})
            source = cached_export(counterpart, default_cache(work.out), work.unpruned)
    # Labelled validation images: NNCF's accuracy control holds int8's drop (today's recipe without labels).
    labelled = (images.images, images.labels) if source and images is not None and images.labels is not None else None
    what = ", NNCF with accuracy control)" if labelled else ", NNCF calibrating)" if source else ")"
    with work.progress(f"writing the OpenVINO IR ({precision}{what}"):
        ir_spec = write_ir(
            work.tmp,
            precision,
            work.calib.images if work.calib else None,
            source / ONNX_FILE if source else None,
            validation=labelled,
            max_accuracy_drop=drop,
        )
    return replace(work, exported=replace(work.exported, spec=ir_spec)), ir_spec.artifacts["openvino"]


def _time(
    work: _Work,
    latency: LatencyOptions | None,
    calibration: CalibrationOptions | None,
    openvino: bool,
    images: ValImages | None,
) -> tuple[Latency | None, Stack | None]:
    """The report's latency and stack (``(None, None)`` when ``latency`` is None): the variant
    stack where the precision (or ``openvino``) has one, else pruned against unpruned."""
    if latency is None:
        return None, None
    spec, progress, bound = work.spec, work.progress, work.exported.plan.flops().bound
    runtimes = stack_runtimes(spec.precision, runtimes=("onnxruntime", "openvino") if openvino else ())
    if runtimes is None:
        with progress("exporting the unpruned baseline (cached)"):
            base_dir = unpruned_export(work.exported.spec, default_cache(work.out), work.unpruned)
        with progress("timing pruned vs unpruned (ONNX Runtime, interleaved)"):
            timing, _ = _latency({"unpruned": base_dir, "pruned": work.tmp}, latency, bound)
        return timing, None
    # The unpruned int8 counterpart sees the same calibration set (the default one is cached as such).
    custom = calibration is not None and calibration != CalibrationOptions()
    with progress("exporting the fp32 and unpruned counterparts (cached)"):
        exports = stack_exports(
            work.exported.spec,
            work.tmp,
            default_cache(work.out),
            work.unpruned,
            work.calib.images if custom else None,
            runtimes,
        )
    with progress(f"timing the variant stack ({', '.join(runtimes)}, interleaved)"):
        # The report names the export's files where they will be: in out, once tmp is renamed.
        timing, stack = _latency(exports, latency, bound, spec.precision, {work.tmp: work.out})
    with progress("top-1 of every stack variant"):
        images = images if images is not None else validation_images(spec.model, work.unpruned)
        stack = replace(stack, accuracy=StackAccuracy.from_dict(stack_accuracy(exports, images, latency.timing.threads)))
    return timing, stack


def _write_report(
    work: _Work,
    checked: ValidationReport | None,
    timing: Latency | None,
    stack: Stack | None,
    lm_params: float,
    ov_record: dict | None,
    ov_checked: ValidationReport | None,
) -> ExportReport:
    """Build the export's report and write it into ``tmp``."""
    record = None
    if work.calib is not None:
        record = Calibration(method="minmax", source=work.calib.source, images=len(work.calib.images), recipe=INT8_RECIPE)
    ov_section = None
    if ov_record is not None:
        ov_section = Openvino(artifact=OpenvinoArtifact.from_dict(ov_record), validation=ov_checked)
    report = build_report(work.exported, checked, timing, lm_params, stack=stack, calibration=record, openvino=ov_section)
    write_report(work.tmp, report)
    return report


def _build_engine(
    work: _Work,
    engine: EngineOptions,
) -> list[tuple[str, str]]:
    """Build the TensorRT engine into ``tmp``: the result's line naming it where it will be."""
    from colln.export.tensorrt import build_engine

    with work.progress("building the TensorRT engine"):
        plan = build_engine(work.tmp, engine.batch_min, engine.batch_opt, engine.batch_max, engine.timing_cache)
    return [("TensorRT", f"{work.out / plan.name} (batch {engine.batch_min}/{engine.batch_opt}/{engine.batch_max})")]


def _triton_entry(
    out: Path,
    triton: TritonOptions,
) -> tuple[str, str]:
    """Write the Triton model repository entry for the export in ``out``: the result's line naming it."""
    from colln.export.triton import write_model_repository

    model_dir = write_model_repository(out, triton.repo, backend=triton.backend, max_batch=triton.max_batch)
    return "Triton", f"{model_dir} ({triton.backend})"


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
