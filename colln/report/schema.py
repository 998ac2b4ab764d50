"""The typed report.json of an export directory: one dataclass per section, written by
:func:`colln.report.export_report.build_report`, read by :mod:`colln.report.render`, and turned
into JSON and back in one place (:meth:`Section.to_dict`, :meth:`Section.from_dict`).

The schema page docs/reference/report-json.md is generated from these classes: run
``python -m colln.report.schema > docs/reference/report-json.md`` after changing them
(tests/test_report_schema.py fails while the checked-in page differs).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from colln.infer.timing import LatencyStats, Timing
from colln.verify.validate import LayerCheck, Tolerances, ValidationReport

SCHEMA = 1
S = TypeVar("S", bound="Section")


def _doc(
    text: str,
    *,
    omit_none: bool = False,
) -> dict:
    """A field's line on the schema page; ``omit_none``: the key is left out, not ``null``, when unset."""
    return {"doc": text, "omit_none": omit_none}


class Section:
    """A dataclass of report.json: serialized field by field, nested sections and the classes
    with their own ``to_dict`` (:class:`ValidationReport`, :class:`Timing`, :class:`LatencyStats`)
    included."""

    def to_dict(self) -> dict:
        return _encode(self)

    @classmethod
    def from_dict(
        cls: type[S],
        data: dict,
    ) -> S:
        """The typed section of a JSON dict this class wrote (a key it does not know is a ValueError)."""
        return _decode(cls, data)


def _encode(
    value: object,
) -> object:
    if isinstance(value, Section):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = _encode(item)
        return out
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(
    tp: Any,
    value: object,
) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        # Several arms (``int | str``): plain JSON values, kept as they are.
        return _decode(arms[0], value) if len(arms) == 1 else value
    if origin is list:
        return [_decode(args[0], v) for v in value]
    if origin is dict:
        return {k: _decode(args[1], v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        # Properties written beside the fields (ValidationReport's ``passed``) follow from them.
        unknown = {k for k in value if k not in names and not isinstance(getattr(tp, k, None), property)}
        if unknown:
            raise ValueError(f"{tp.__name__} has no field {', '.join(sorted(unknown))}")
        return tp(**{k: _decode(hints[k], v) for k, v in value.items() if k in names})
    return value


@dataclass(frozen=True)
class Model(Section):
    name: str = field(metadata=_doc("the model's name (`colln-export`'s first argument)"))
    weights: str = field(metadata=_doc('`"bundled"`, `"random"`, `"pretrained"` or the weights file'))
    input_size: list[int] = field(metadata=_doc("`[3, H, W]`"))
    num_classes: int = field(metadata=_doc("0 for a model without a classifier"))
    params: int = field(metadata=_doc("parameters of the unpruned model"))


@dataclass(frozen=True)
class Calibration(Section):
    """How an int8 export was calibrated."""

    method: str = field(metadata=_doc('`"minmax"`'))
    source: str = field(metadata=_doc("where the calibration images came from"))
    images: int = field(metadata=_doc("how many"))
    recipe: int = field(metadata=_doc("the version of colln's int8 recipe (`colln.export.quantize.RECIPE`)"))


@dataclass(frozen=True)
class Export(Section):
    onnx: str = field(metadata=_doc('the graph\'s file, `"model.onnx"`'))
    onnx_bytes: int = field(metadata=_doc("its size, external data included"))
    opset: int = field(metadata=_doc("ONNX opset"))
    precision: str = field(metadata=_doc('`"fp32"`, `"fp16"` or `"int8"`'))
    topk_k: list[int] = field(metadata=_doc("the K of each TopK in the graph (empty: unpruned)"))
    spec: dict[str, Any] = field(metadata=_doc("the `ExportSpec` as in export.json, without its plan"))
    calibration: Calibration | None = field(metadata=_doc("int8 only"))


@dataclass(frozen=True)
class Flops(Section):
    """Multiply-adds x 2 per image (`colln.models.plan.FlopsEstimate`)."""

    full: int = field(metadata=_doc("the unpruned model"))
    pruned: int = field(metadata=_doc("the pruned model"))
    ratio: float = field(metadata=_doc("pruned / full"))
    bound: float = field(metadata=_doc("full / pruned: the best speedup the plan allows"))


@dataclass(frozen=True)
class Operation(Section):
    """What one block of the pruned model does to the tokens (`colln.models.plan.BlockOp`); the
    blocks without one pass the tokens through."""

    layer: int = field(metadata=_doc("the block"))
    kind: str = field(
        metadata=_doc(
            '`"prune"` (keep `count` candidates), `"merge"` (keep `count`, merge the rest into them), '
            '`"tome"` (merge `count` = r tokens by bipartite matching) or `"select"` (a tokens export\'s final '
            "pick of `count` patch tokens)"
        )
    )
    count: int = field(metadata=_doc("the k kept, or ToMe's r merged"))


@dataclass(frozen=True)
class Tokens(Section):
    """What a tokens export (`--output tokens`) hands a language model, per image."""

    feature_block: int = field(metadata=_doc("the block whose output tokens are the features"))
    num_patches: int = field(
        metadata=_doc("N, the patch tokens of the unpruned model (a VLM tower's: its output tokens, one per k x k group)")
    )
    k: int = field(metadata=_doc("K, the patch tokens output (a VLM tower's: kept groups)"))
    reduction: str = field(metadata=_doc('`"576 -> 192"`'))
    lm_params: float = field(metadata=_doc("parameters of the language model fed (`--lm-params`)"))
    lm_prefill_flops_saved: float = field(metadata=_doc("2 x lm_params x (N - K)"))


@dataclass(frozen=True)
class LatencyPair(Section):
    """One batch size: pruned against unpruned, timed interleaved in one run."""

    unpruned: LatencyStats = field(metadata=_doc(""))
    pruned: LatencyStats = field(metadata=_doc(""))
    speedup: float = field(metadata=_doc("the median of the per-round `unpruned / pruned` time ratios"))
    speedup_iqr: list[float] = field(metadata=_doc("their 25th and 75th percentiles"))


@dataclass(frozen=True)
class Latency(Section):
    """Pruned against unpruned on ONNX Runtime (for an int8 export: pruned int8 against unpruned int8)."""

    backend: str = field(metadata=_doc('`"onnxruntime-cpu"`'))
    timing: Timing = field(metadata=_doc("how it was timed, as colln-bench's report and colln-eval's results.json record it"))
    threads: int | str = field(metadata=_doc('`timing.threads`, `"backend default"` for none (as before `timing` existed)'))
    warmup: int = field(metadata=_doc("`timing.warmup` (as before `timing` existed)"))
    batches: dict[str, LatencyPair] = field(metadata=_doc("per batch size"))
    flops_bound: float = field(metadata=_doc("`flops.bound`"))

    @classmethod
    def of(
        cls,
        timing: Timing,
        batches: dict[str, dict],
        flops_bound: float,
    ) -> Latency:
        """The section for ``batches`` (:func:`colln.measure.bench.latency_rows`) timed as ``timing`` says."""
        return cls(
            backend="onnxruntime-cpu",
            timing=timing,
            threads=timing.threads or "backend default",
            warmup=timing.warmup,
            batches={b: LatencyPair.from_dict(row) for b, row in batches.items()},
            flops_bound=flops_bound,
        )


@dataclass(frozen=True)
class OpenvinoArtifact(Section):
    """The OpenVINO IR as export.json's `artifacts["openvino"]` records it."""

    file: str = field(metadata=_doc('`"openvino/model.xml"`'))
    precision: str = field(metadata=_doc("the IR's precision (`fp32`, `bf16`, `int8`, `int8-bf16`)"))
    inference_precision: str = field(metadata=_doc("the precision OpenVINO ran it at"))
    options: dict[str, Any] = field(metadata=_doc("the compile options (`INFERENCE_PRECISION_HINT`)"))
    sha256: dict[str, str] = field(metadata=_doc("of each IR file"))
    accuracy_control: dict[str, Any] | None = field(
        default=None,
        metadata=_doc(
            "int8 with labelled validation images: NNCF's accuracy control (`method`, `metric`, `images`, `max_drop`)",
            omit_none=True,
        ),
    )
    float_products: list[str] | None = field(
        default=None, metadata=_doc("int8: the matrix products left in float beyond the recipe", omit_none=True)
    )
    runtime_precisions: dict[str, int] | None = field(
        default=None,
        metadata=_doc(
            "how many matrix products of the compiled model's execution graph run at each precision "
            '(`runtimePrecision`), e.g. `{"f32": 12, "u8": 33}`; absent in exports before colln recorded it',
            omit_none=True,
        ),
    )


@dataclass(frozen=True)
class Openvino(Section):
    """`--openvino`: the IR and its validation."""

    artifact: OpenvinoArtifact = field(metadata=_doc(""))
    validation: ValidationReport | None = field(metadata=_doc('as `validation`, backend `"openvino"`; null with `--no-validate`'))


@dataclass(frozen=True)
class StackRow(Section, LatencyStats):
    """One variant at one batch size: its latency and speedups."""

    speedup: float = field(metadata=_doc("over the stack's baseline (ONNX Runtime's unpruned fp32), paired per round"))
    speedup_iqr: list[float] = field(metadata=_doc("its 25th and 75th percentiles"))
    speedup_same_runtime: float | None = field(
        default=None, metadata=_doc("over the same runtime's unpruned variant at the same precision")
    )
    speedup_same_runtime_iqr: list[float] | None = field(default=None, metadata=_doc("its 25th and 75th percentiles"))


@dataclass(frozen=True)
class StackArtifact(Section):
    """The artifact and the options behind a variant's figures."""

    runtime: str = field(metadata=_doc('`"onnxruntime"` or `"openvino"`'))
    artifact: str = field(metadata=_doc("path of the file timed"))
    options: dict[str, Any] = field(metadata=_doc("session or compile options"))
    runtime_precisions: dict[str, int] | None = field(
        default=None,
        metadata=_doc("OpenVINO: how many matrix products its compiled model runs at each precision", omit_none=True),
    )


@dataclass(frozen=True)
class StackAccuracy(Section):
    """Top-1 of every variant on the validation images."""

    source: str = field(metadata=_doc("the images"))
    images: int = field(metadata=_doc("how many"))
    accuracy: dict[str, float] | None = field(metadata=_doc("per variant; null without labels"))
    top1_agreement: dict[str, float] = field(metadata=_doc("per variant, with the baseline"))


@dataclass(frozen=True)
class Stack(Section):
    """int8 and `--openvino` exports: every variant timed in one interleaved run (colln-bench's report
    has the same, without `accuracy`)."""

    baseline: str = field(metadata=_doc('`"unpruned-fp32"`'))
    variants: list[str] = field(
        metadata=_doc(
            '`["unpruned-fp32", "pruned-fp32", "unpruned-int8", "pruned-int8", "openvino:unpruned-fp32", ...]`: '
            'variants off ONNX Runtime are named `"<runtime>:<variant>"`'
        )
    )
    flops_bound: float = field(metadata=_doc("`flops.bound`"))
    batches: dict[str, dict[str, StackRow]] = field(metadata=_doc("per batch size, per variant"))
    artifacts: dict[str, StackArtifact] | None = field(metadata=_doc("per variant"))
    accuracy: StackAccuracy | None = field(default=None, metadata=_doc("report.json only", omit_none=True))


@dataclass(frozen=True)
class Environment(Section):
    machine: str = field(metadata=_doc("the machine's id"))
    cpu: str = field(metadata=_doc("the CPU's name"))
    cpu_flags: dict[str, bool] | None = field(
        metadata=_doc(
            "for each of `avx512_vnni`, `avx512_bf16`, `avx512_fp16`, `avx_vnni`, `amx_tile`, `amx_int8`, `amx_bf16` "
            "(the instructions the runtimes pick int8, bf16 and fp16 kernels by), whether /proc/cpuinfo lists it; "
            "null where there is no /proc/cpuinfo (not Linux)"
        )
    )
    cpus: int = field(metadata=_doc("logical CPUs"))
    platform: str = field(metadata=_doc("`platform.platform()`"))
    loadavg: list[float] = field(metadata=_doc("load averages over 1, 5, 15 min, when the report was written"))


@dataclass(frozen=True)
class ExportReport(Section):
    """report.json. A section is `null` where its step was skipped (`--no-validate`, `--no-latency`;
    a logits export has no `tokens`, an fp32 export no `stack`)."""

    schema: int = field(metadata=_doc(f"`{SCHEMA}`"))
    created: str = field(metadata=_doc("UTC, ISO 8601"))
    model: Model = field(metadata=_doc(""))
    export: Export = field(metadata=_doc(""))
    plan: dict[str, Any] = field(
        metadata=_doc(
            "the keep plan as export.json records it (`KeepPlan.to_dict()`: layers, keep_rates, keep_counts, "
            'tokens_in, tokens_out, operations, metric, norm, ..., flops), and `"summary"`: `str(plan)`'
        )
    )
    operations: list[Operation] = field(
        metadata=_doc("the plan's operations, in block order (empty: no block changes the tokens)")
    )
    flops: Flops = field(metadata=_doc(""))
    tokens: Tokens | None = field(metadata=_doc("`--output tokens` only"))
    validation: ValidationReport | None = field(metadata=_doc("ONNX Runtime against PyTorch"))
    latency: Latency | None = field(metadata=_doc(""))
    stack: Stack | None = field(metadata=_doc("int8 and `--openvino` exports"))
    versions: dict[str, str] = field(metadata=_doc("python, colln, torch, timm, onnx, onnxruntime, ..."))
    environment: Environment = field(metadata=_doc(""))
    openvino: Openvino | None = field(default=None, metadata=_doc("`--openvino` only (absent otherwise)", omit_none=True))


# The lines of the fields of the classes colln.verify and colln.infer own (they carry no _doc).
FOREIGN_DOCS = {
    (ValidationReport, "backend"): '`"onnxruntime"`, `"openvino"`, ...',
    (ValidationReport, "reference"): '`"torch"`',
    (ValidationReport, "precision"): "the precision the tolerances are for",
    (ValidationReport, "images"): "validation images",
    (ValidationReport, "source"): "where they came from",
    (ValidationReport, "tolerances"): "the limits applied ([tolerances](tolerances.md))",
    (ValidationReport, "kept_sets_observed"): "whether the backend's kept indices were compared with PyTorch's",
    (ValidationReport, "judged_images"): "images the verdict used (near-ties at a pruning boundary left out)",
    (ValidationReport, "top1_agreement"): "with PyTorch, all images; null for tokens and dense outputs",
    (ValidationReport, "top1_agreement_judged"): "with PyTorch, judged images",
    (ValidationReport, "max_abs_error"): "largest absolute output error, all images",
    (ValidationReport, "mean_abs_error"): "mean absolute output error, all images",
    (ValidationReport, "min_cosine"): "lowest cosine of an image's output (tokens: of its lowest row), all images",
    (ValidationReport, "mean_cosine"): "mean of those cosines",
    (ValidationReport, "min_cosine_judged"): "lowest cosine, judged images; null when none was judged",
    (ValidationReport, "max_abs_error_judged"): "largest error, judged images; null when none was judged",
    (ValidationReport, "layers"): "per pruning layer",
    (ValidationReport, "unpruned_top1_agreement"): '`{"torch", "<backend>"}`: top-1 agreement with the unpruned model',
    (ValidationReport, "accuracy"): '`{"unpruned", "torch", "<backend>"}` where labels exist',
    (ValidationReport, "mismatches"): "why it failed (empty: passed)",
    (ValidationReport, "output"): '`"logits"`, `"tokens"` or `"dense"`',
    (ValidationReport, "judged_required"): "the fewest judged images a pass needs (fewer: a failure)",
    (ValidationReport, "warnings"): "what did not fail the check but may matter",
    (ValidationReport, "error_quantiles"): "int8: median / p99 / max of the relative logit error and of 1 - cosine, "
    "over the judged and over all images",
    (ValidationReport, "passed"): "no mismatches",
    (Tolerances, "min_cosine"): "the lowest cosine a judged image may have",
    (Tolerances, "logit_rtol"): "the largest error, relative to max(1, the reference's largest magnitude)",
    (Tolerances, "tie_rtol"): "the relative margin below which an image is a near-tie, not judged (the floor of the tie band)",
    (Tolerances, "max_accuracy_drop"): "int8 only (absent otherwise)",
    (Tolerances, "min_top1_agreement"): "int8: the lowest top-1 agreement with PyTorch over all images",
    (Tolerances, "min_mean_overlap"): "int8: the lowest mean kept-set overlap of a pruning layer over all images",
    (Tolerances, "median_logit_rtol"): "int8: the largest median relative logit error, judged images",
    (Tolerances, "p99_logit_rtol"): "int8: the largest 99th percentile of that error (set: the int8 rule applies)",
    (Tolerances, "median_cosine_gap"): "int8: the largest median of 1 - cosine, judged images",
    (Tolerances, "p99_cosine_gap"): "int8: the largest 99th percentile of 1 - cosine, judged images",
    (LayerCheck, "layer"): "the block",
    (LayerCheck, "k"): "tokens kept there",
    (LayerCheck, "min_margin"): "smallest score gap between the k-th and the (k+1)-th token; null: nothing pruned",
    (LayerCheck, "min_relative_margin"): "that gap relative to the scores' scale; null: nothing pruned",
    (LayerCheck, "tied_images"): "images with a near-tie at this boundary",
    (LayerCheck, "compared_images"): "images whose kept sets were compared",
    (LayerCheck, "mean_overlap"): "mean fraction of kept tokens in common with PyTorch",
    (LayerCheck, "identical_fraction"): "fraction of images with identical kept sets",
    (LayerCheck, "diverged_here"): "images whose kept set first differs at this layer",
    (LayerCheck, "explained"): "of those, how many a near-tie explains",
    (LayerCheck, "min_merge_margin"): "merging: smallest gap between a merged token's best and second-best destination",
    (LayerCheck, "merge_tied_images"): "merging: images with a near-tie there",
    (LayerCheck, "fp32_score_error"): "PyTorch's fp32 scores' largest error against float64, relative to the top score",
    (LayerCheck, "max_tie_band"): "the widest relative tie band an image had: tie_rtol, or 4x its fp32 score error",
    (LayerCheck, "mean_overlap_all"): "int8: mean kept-set overlap over all images",
    (LayerCheck, "outside_band"): "int8: images that kept tokens outside PyTorch's tie band",
    (LatencyStats, "batch"): "images per call",
    (LatencyStats, "rounds"): "timed rounds; by default as many as fit in about 20 s per batch size (5..50)",
    (LatencyStats, "p50_ms"): "median ms per call",
    (LatencyStats, "p90_ms"): "90th percentile",
    (LatencyStats, "p99_ms"): "99th percentile",
    (LatencyStats, "mean_ms"): "mean",
    (LatencyStats, "images_per_s"): "at the median",
    (Timing, "rounds"): "null: automatic",
    (Timing, "warmup"): "untimed rounds per batch size",
    (Timing, "threads"): "null: the runtime's default",
    (Timing, "split_batches"): "batches sliced across threads (ONNX Runtime)",
    (Timing, "budget_s"): "seconds per batch size the automatic rounds fit in",
}

INTRO = """\
`colln-export` writes `report.json` (and the same content as `report.md`) into every export
directory. This page is generated from the dataclasses of `colln/report/schema.py`
(`python -m colln.report.schema > docs/reference/report-json.md`); the tests fail while it
differs from them.

Each section below is a JSON object with the fields listed; a type in a link is another
section, `[X]` a list, `{str: X}` an object keyed by strings (a batch size, a variant's name).
"""

NOTES = """\
## Notes

- `speedup` is the median of the per-round `unpruned / pruned` time ratios: both models are timed
  in the same run, interleaved in shuffled order, so load drifts hit both alike.
- `latency.timing`: how it was timed, the same field colln-bench's report and colln-eval's
  results.json carry ([Timing options](index.md#timing-options)).
- report.md and colln-bench's summary show `environment.cpu_flags` beside the CPU's name.
- JSON has no infinity: infinite margins (a layer that prunes nothing) are `null`.
- For an int8 export, `latency.batches[b].pruned/unpruned/speedup` compares pruned int8 with
  unpruned int8, and `stack` times all four variants in one interleaved run, speedups over unpruned
  fp32 (see [int8 on top of pruning](../int8.md#the-stack-in-reportjson-reportmd-and-colln-bench)).
- For `--output tokens`, `validation.output` is `"tokens"`, the top-1 fields are `null`, and the
  `tokens` section sits next to `flops` (the encoder's own bound); see
  [Vision-language towers](../vlm.md#validation-benchmarks-serving).

## Other files of an export directory

- `model.onnx` (colln-export): the graph: input `images`, output `logits` (or `tokens` and
  `indices`), the keep plan in its metadata.
- `export.json` (colln-export): the `ExportSpec` (model, weights and their sha256 for a file, image
  size, pruning, precision, opset) and the resolved plan; every command rebuilds the PyTorch
  reference from it.
- `report.json`, `report.md` (colln-export): above.
- `model.plan`, `model.plan.json`, `model.plan.log` (colln-export `--trt`, colln-build): the
  TensorRT engine, what it was built with and for ([TensorRT](../tensorrt.md)).

colln-bench's `--json` report has per batch `unpruned`, `pruned`, `speedup`, `speedup_iqr`,
`bound`, `efficiency`, the environment and, for int8 exports, the same `stack` (without accuracy);
see [colln-bench](colln-bench.md).
"""


def _sections(
    root: type,
) -> list[type]:
    """``root`` and every dataclass its fields reach, in first-seen order."""
    seen: list[type] = []

    def visit(tp: Any) -> None:
        if dataclasses.is_dataclass(tp):
            if tp in seen:
                return
            seen.append(tp)
            for hint in typing.get_type_hints(tp).values():
                visit(hint)
        for arg in typing.get_args(tp):
            visit(arg)

    visit(root)
    return seen


def _type_text(
    tp: Any,
) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is list:
        return f"[{_type_text(args[0])}]"
    if origin is dict:
        return f"{{str: {_type_text(args[1])}}}"
    if dataclasses.is_dataclass(tp):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return "any" if tp is Any else tp.__name__


def _paragraph(
    cls: type,
) -> str:
    """A class's own docstring as one markdown paragraph (none: inherited or generated by dataclass)."""
    text = cls.__dict__.get("__doc__") or ""
    if not text or text.startswith(f"{cls.__name__}("):
        return ""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", " ".join(inspect.cleandoc(text).split()))
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _foreign_doc(
    cls: type,
    name: str,
) -> str:
    return next((FOREIGN_DOCS[(c, name)] for c in cls.__mro__ if (c, name) in FOREIGN_DOCS), "")


def _rows(
    cls: type,
) -> list[tuple[str, str, str]]:
    hints = typing.get_type_hints(cls)
    rows = [
        (f.name, _type_text(hints[f.name]), f.metadata.get("doc") or _foreign_doc(cls, f.name)) for f in dataclasses.fields(cls)
    ]
    # Properties a class writes beside its fields (ValidationReport's ``passed``).
    props = [n for n, v in vars(cls).items() if isinstance(v, property) and (cls, n) in FOREIGN_DOCS]
    return rows + [(n, _type_text(typing.get_type_hints(getattr(cls, n).fget)["return"]), FOREIGN_DOCS[(cls, n)]) for n in props]


def schema_markdown() -> str:
    """docs/reference/report-json.md: every section of :class:`ExportReport`, then the notes."""
    parts = [f"# report.json (schema {SCHEMA})", "", INTRO]
    for cls in _sections(ExportReport):
        parts += [f"### {cls.__name__}", ""]
        about = _paragraph(cls)
        parts += [about, ""] if about else []
        parts += ["| field | type | meaning |", "|---|---|---|"]
        parts += [f"| `{name}` | {kind} | {doc} |" for name, kind, doc in _rows(cls)]
        parts.append("")
    return "\n".join(parts) + "\n" + NOTES


if __name__ == "__main__":
    sys.stdout.write(schema_markdown())
