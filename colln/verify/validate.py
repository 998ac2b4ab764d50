"""Validation: does a deployed backend compute what the pruned PyTorch model computes?

The reference is the pruned PyTorch model rebuilt from the export's spec (fp32). The candidate is
any runner (ONNX Runtime, TensorRT, PyTorch). Both run on the same preprocessed images through
polygraphy's ``Comparator``; the unpruned PyTorch model runs beside them for the quality numbers.

Why ties need care: a pruning layer keeps the top-k scores. When the k-th and (k+1)-th score are
closer than float noise between backends, the two backends may keep different tokens, and from
there on their activations legitimately differ (random-init ViTs are full of such near-ties). So:

1. Where the candidate can say what it kept (ONNX Runtime through an in-memory copy of the graph
   with the TopK indices as extra outputs; see :func:`colln.export.onnx.with_kept_outputs`), the
   kept sets are compared layer by layer. At the first layer where they differ, the divergence is
   *explained* when every token only one side kept has a PyTorch score within the tie band,
   ``tie_rtol * max(score)`` or wider where fp32's own error is (below), of PyTorch's k-th score
   (for ``colln`` and ``cls``; for ``correct``, whose [CLS] stage is not scored in the record,
   when PyTorch's Col-Ln margin at k is within that band). An unexplained divergence is a
   mismatch. Images that diverged are left out of the logit checks (their inputs to later blocks
   differ by construction) and counted in the report.
2. Where it cannot (TensorRT, PyTorch), images whose smallest relative boundary margin at any
   pruning layer is within the tie band are left out of the logit checks instead.

Merging (``--merge``, ``--tome``) adds choices that can flip on float noise the same way: the
kept token a dropped one joins (its most similar by key cosine) and, for ToMe, which edges merge
(the r-th and (r+1)-th best edge similarity: the same boundary margin, with k = r) and each
merged token's destination. PyTorch records, per image, the smallest gap between a merged
token's best and second-best destination; images where that gap is within ``tie_rtol`` (cosine
similarities lie in [-1, 1], so the gap is already relative) are reported and left out of the
logit checks. ToMe's ranks are not observed in the graph: its edge margins go through rule 2.
Every other difference between the backends is a mismatch.

On the images that remain ("judged"), per image: cosine similarity of the logits >= ``min_cosine``,
max absolute error <= ``logit_rtol * max(1, max |reference logit|)``, and the same top-1 class
unless PyTorch's own top-1/top-2 gap is within that error tolerance. Defaults (:data:`TOLERANCES`):

    precision  min_cosine  logit_rtol  tie_rtol
    fp32       0.9999      1e-3        1e-4
    fp16       0.995       5e-2        1e-2
    bf16       0.995       5e-2        1e-2    (OpenVINO's bf16 hint)

fp32 backends differ from PyTorch by ~1e-6 relative, so fp32 limits leave ~100x headroom; the
fp16 graph rounds activations to 11 bits, hence looser limits and a wider tie band.

The tie band is never narrower than what fp32 itself resolves. The pruned reference also runs in
float64 on the same images, and per image and selection layer the largest error of its fp32 scores,
``e = max |s32 - s64| / max |s64|``, is measured; the band is ``max(tie_rtol, FP32_TIE_FACTOR * e)``
(:data:`FP32_TIE_FACTOR`). Models whose fp32 scores err ~1e-6 of the top score (digits_vit, the timm
backbones) keep ``tie_rtol``; a tower whose attention amplifies rounding (Gemma 4's unscaled
attention on normalized q and k: a random-weight ``gemma4_vit_167m_enc``'s fp32 scores err up to
7e-4 of the top score) gets the band its fp32 scores can resolve. Where the float64 run kept another
set at an earlier layer (fp32's own near-tie), an image's error at the later layers is the largest
measured there over the other images.

int8 and int8-bf16 (OpenVINO's int8 IR at the bf16 hint) are judged by the int8 rule
(:attr:`Tolerances.statistical`, :data:`INT8`) on the task and on error quantiles instead of the
worst image: top-1 agreement over all images, the accuracy drop where labels exist
(``max_accuracy_drop``, ``--max-accuracy-drop``), each pruning layer's mean kept-set overlap over
all images (a divergence outside the tie band is a warning), the median and p99 of the judged
images' relative errors and ``1 - cosine``, and no quantization on the selection path in the graph
(:func:`quantized_selection`). Its limits come from what int8 alone moves in the unpruned model
(docs/reference/tolerances.md): int8 moves single images as far as a wrong graph would.

A pass needs enough judged images (:func:`required_judged`): at least half of them, and at least
30 (all of them when fewer are validated). Fewer is a failure of its own ("too few images judged"):
the kept-set check alone is no evidence that the logits are right.

What is judged is what the backend deploys (:func:`validate_backend`): the runner every command
opens. The kept sets are read from a copy of the graph with the TopK indices as extra outputs,
which may compile differently (OpenVINO); on images where that copy's outputs are not the deployed
ones within the tolerances, near-tied selections are left out as by rule 2.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from torch import nn

from colln.data import ValImages, top1_accuracy, validation_images
from colln.errors import ValidationFailedError
from colln.export.artifact import read_export
from colln.export.manifest import deployed as deployed_artifact
from colln.export.precisions import VOCABULARY
from colln.export.quantize import DEFAULT_MAX_ACCURACY_DROP
from colln.export.spec import FEATURES_NAME, INDICES_NAME, INPUT_NAME, OUTPUT_NAME, TOKENS_NAME
from colln.infer.runners import TorchRunner, feeds, open_runner
from colln.models import ops
from colln.models.plan import KeepPlan
from colln.models.rewrite import Selection, get_plan, record_selections

# A pass needs evidence from the images themselves (see :func:`required_judged`): at least half of
# them judged end to end, since the ones left out are the near-ties, not a random sample; and at
# least 30, as no failure among 30 judged images puts the per-image failure rate below 10% with 95%
# confidence (the rule of three).
MIN_JUDGED_FRACTION = 0.5
MIN_JUDGED_IMAGES = 30
# Backends whose graph can also output the kept indices (a copy of it, read for the kept sets).
KEPT_SET_BACKENDS = ("onnxruntime", "openvino")
# The tie band over PyTorch's measured fp32 score error e (see the module docstring): PyTorch's fp32
# scores are within e of the exact ones, an fp32 candidate's about as close, so two tokens whose
# reference scores lie within 2 (e + e) may swap. Measured on a random-weight gemma4_vit_167m_enc:
# ONNX Runtime's and OpenVINO's scores err 0.9-1.7x PyTorch's fp32 e; the flips seen (OpenVINO, and
# float64 against float32 on tiny Gemma 4 towers) lay within 0.04-1.0 e of the k-th score.
FP32_TIE_FACTOR = 4.0


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail limits of a validation; see the module docstring for how each is applied.

    The int8 rule (``p99_logit_rtol`` set, :attr:`statistical`) judges distributions instead of the
    worst image: top-1 agreement with the reference over all images >= ``min_top1_agreement``, each
    pruning layer's mean kept-set overlap over all images >= ``min_mean_overlap``, and over the
    judged images the median and 99th percentile of the relative max |logit error| (``logit_rtol``'s
    quantity) and of ``1 - cosine`` within ``median_logit_rtol`` / ``p99_logit_rtol`` and
    ``median_cosine_gap`` / ``p99_cosine_gap``. ``min_cosine`` and ``logit_rtol`` then only decide
    whether a kept-set copy speaks for the deployed graph (:func:`_differ`) and which top-2 gaps are
    clear."""

    min_cosine: float
    logit_rtol: float
    tie_rtol: float
    max_accuracy_drop: float | None = None
    min_top1_agreement: float | None = None
    min_mean_overlap: float | None = None
    median_logit_rtol: float | None = None
    p99_logit_rtol: float | None = None
    median_cosine_gap: float | None = None
    p99_cosine_gap: float | None = None

    @property
    def statistical(self) -> bool:
        """Judged on quantiles and task agreement (int8), not image by image."""
        return self.p99_logit_rtol is not None


# The int8 rule (see Tolerances). Limits from what int8 alone moves: the int8 exports of the unpruned
# digits_vit (keep 1.0; 450 test images) against fp32 PyTorch, worst runtime (OpenVINO int8 at the
# f32 / bf16 hint; ONNX Runtime's is ~3x tighter): median / p99 relative max |logit error| 0.016 /
# 0.115, of 1 - cosine 2.3e-4 / 6.1e-3, top-1 agreement 0.989. A pruned int8 graph that kept the
# same tokens moves as much (keep 0.7: 0.016 / 0.122, 2.4e-4 / 7.9e-3, 0.993): limits ~2x that,
# top-1 disagreement ~3x. Kept-set overlap has no unpruned counterpart: keep 0.7 measured >= 0.981
# per layer (int8-bf16 0.98); 0.95. Details: docs/reference/tolerances.md.
INT8 = Tolerances(
    min_cosine=0.99,
    logit_rtol=1e-1,
    tie_rtol=1e-2,
    max_accuracy_drop=DEFAULT_MAX_ACCURACY_DROP,
    min_top1_agreement=0.97,
    min_mean_overlap=0.95,
    median_logit_rtol=0.03,
    p99_logit_rtol=0.25,
    median_cosine_gap=5e-4,
    p99_cosine_gap=1.5e-2,
)
# The tolerance rows (colln.export.precisions.Precision.tolerance names one per precision).
_ROWS = {
    "fp32": Tolerances(min_cosine=0.9999, logit_rtol=1e-3, tie_rtol=1e-4),
    "fp16": Tolerances(min_cosine=0.995, logit_rtol=5e-2, tie_rtol=1e-2),
    # OpenVINO's bf16 inference (8-bit mantissa, but accumulations stay fp32): digits_vit keep 0.7
    # judged min cosine 0.99975, max |logit error| 1.3 of ~25 (within fp16's limits).
    "bf16": Tolerances(min_cosine=0.995, logit_rtol=5e-2, tie_rtol=1e-2),
    "int8": INT8,
}
# Every precision of colln's vocabulary, judged by its row (OpenVINO's int8-bf16: int8's rule and limits).
TOLERANCES = {name: _ROWS[p.tolerance] for name, p in VOCABULARY.items()}


@dataclass(frozen=True)
class LayerCheck:
    """One pruning layer: PyTorch's boundary margins and, when observed, kept-set agreement."""

    layer: int
    k: int
    min_margin: float
    min_relative_margin: float
    tied_images: int
    compared_images: int | None = None
    mean_overlap: float | None = None
    identical_fraction: float | None = None
    diverged_here: int | None = None
    explained: int | None = None
    # Over all images (not only those whose earlier layers agreed): the mean of |T & C| / max(|T|, |C|)
    # of the two kept sets, and how many images kept tokens outside the tie band here.
    mean_overlap_all: float | None = None
    outside_band: int | None = None
    # Merging layers: the smallest gap between a merged token's best and second-best destination.
    min_merge_margin: float | None = None
    merge_tied_images: int | None = None
    # PyTorch's fp32 score error against float64 (the largest over the images, relative to the top
    # score) and the widest tie band an image had here (tie_rtol, or FP32_TIE_FACTOR times its error).
    fp32_score_error: float | None = None
    max_tie_band: float | None = None


@dataclass
class ValidationReport:
    """What :func:`validate` found. ``passed`` is false when ``mismatches`` is not empty.

    Every field means the same for logits and tokens (``output``): ``max_abs_error``,
    ``mean_abs_error``, ``min_cosine`` and ``mean_cosine`` are over all images (an image's cosine:
    of its logits, or its lowest token row's); the ``*_judged`` fields over the judged images only,
    the ones the verdict used (``None`` when none was judged). Top-1 is ``None`` for tokens."""

    backend: str
    reference: str
    precision: str
    images: int
    source: str
    tolerances: Tolerances
    kept_sets_observed: bool
    judged_images: int
    top1_agreement: float | None
    top1_agreement_judged: float | None
    max_abs_error: float
    mean_abs_error: float
    min_cosine: float
    mean_cosine: float
    min_cosine_judged: float | None
    max_abs_error_judged: float | None
    layers: list[LayerCheck]
    unpruned_top1_agreement: dict[str, float]
    accuracy: dict[str, float] | None
    mismatches: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # "tokens": the errors and cosines are of the kept tokens' features (per token row), top-1 is None.
    output: str = "logits"
    # The fewest judged images a pass needs (:func:`required_judged`); fewer is a mismatch.
    judged_required: int = 0
    # Median / p99 / max of the per-image relative max |error| and 1 - cosine (:func:`error_quantiles`).
    error_quantiles: dict | None = None

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        # Only int8 has an accuracy gate and the statistical limits: fp32/fp16 reports keep their three keys.
        out["tolerances"] = {k: v for k, v in out["tolerances"].items() if v is not None}
        return _finite(out)

    def raise_if_failed(
        self,
        where: Path | None = None,
    ) -> None:
        if self.passed:
            return
        more = f" (+{len(self.mismatches) - 1} more)" if len(self.mismatches) > 1 else ""
        see = f"; details in {where}" if where is not None else ""
        if self.judged_images < self.judged_required and len(self.mismatches) == 1:
            # Nothing disagreed: too little was checked to call it a pass.
            raise ValidationFailedError(f"{self.backend} could not be validated against torch: {self.mismatches[0]}{see}")
        raise ValidationFailedError(f"{self.backend} disagrees with torch: {self.mismatches[0]}{more}{see}")


def _finite(
    value: object,
) -> object:
    """JSON has no inf/nan: they become None (an unpruned layer's margin is infinite)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class Reference:
    """What the PyTorch reference computed on the validation images: its ``outputs`` (logits, or a
    tokens or dense model's features), the unpruned model's logits (``None`` for tokens) and, per selection
    layer, the kept indices and the scores they were picked by, and per merging layer the margins of
    its merge choices (the tie rule for merges)."""

    outputs: np.ndarray
    unpruned: np.ndarray | None
    kept: dict[int, np.ndarray]
    scores: dict[int, np.ndarray]
    merge_margins: dict[int, np.ndarray] = field(default_factory=dict)
    # Per selection layer and image: the fp32 scores' largest error against float64, relative to the
    # top score (:func:`_score_errors`); a layer without one has the band tie_rtol.
    score_errors: dict[int, np.ndarray] = field(default_factory=dict)


def _error_fields(
    err: np.ndarray,
    cos: np.ndarray,
    judged: np.ndarray,
) -> dict[str, float | None]:
    """The error fields of a :class:`ValidationReport` from per-image absolute errors ``err`` (one
    row per image) and cosines ``cos``: over all images, and over the ``judged`` ones."""
    any_judged = bool(judged.any())
    return {
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "min_cosine_judged": float(cos[judged].min()) if any_judged else None,
        "max_abs_error_judged": float(err[judged].max()) if any_judged else None,
    }


def validate_export(
    export_dir: Path,
    backend: str = "onnxruntime",
    val_images: Path | None = None,
    pruned: nn.Module | None = None,
    unpruned: nn.Module | None = None,
    device: str = "cpu",
    batch: int = 32,
    limit: int | None = None,
    max_accuracy_drop: float | None = None,
) -> ValidationReport:
    """Validate the ``backend`` of an export directory against its pruned PyTorch reference on
    (``limit`` of, :func:`colln.data.pick`) the validation images. ``pruned`` / ``unpruned`` skip rebuilding the
    reference when the caller already has it. ``max_accuracy_drop``: see :func:`tolerances_for`."""
    spec = read_export(export_dir)
    unpruned = unpruned if unpruned is not None else spec.load_unpruned()
    pruned = pruned if pruned is not None else spec.apply(unpruned)
    images = validation_images(spec.model, unpruned, val_images, limit)
    return validate_backend(
        export_dir, backend, pruned, unpruned, images, device=device, batch=batch, max_accuracy_drop=max_accuracy_drop
    )


def tolerances_for(
    precision: str,
    max_accuracy_drop: float | None = None,
) -> Tolerances:
    """:data:`TOLERANCES` of ``precision``, with the accuracy gate at ``max_accuracy_drop`` (a
    fraction; None: the default) where the precision has one (int8)."""
    tol = TOLERANCES[precision]
    if max_accuracy_drop is None or tol.max_accuracy_drop is None:
        return tol
    return replace(tol, max_accuracy_drop=float(max_accuracy_drop))


def quantized_selection(
    export_dir: Path,
    backend: str,
) -> list[str]:
    """Where the int8 graph ``backend`` runs from ``export_dir`` quantizes the token selection or
    the float region around it (:func:`colln.export.quantize.selection_crossings` on ``model.onnx``
    and the listed ONNX Runtime file, :func:`colln.export.openvino.selection_crossings` on the IR).
    A quantized ranking is wrong whatever the statistics say: it flips near-tied choices, which the
    int8 rule otherwise counts as near-ties."""
    import onnx

    from colln.export.spec import ONNX_FILE, ORT_FILE

    if backend == "openvino":
        from colln.export.openvino import IR_FILE, ov_module, selection_crossings

        return selection_crossings(ov_module().Core().read_model(str(Path(export_dir) / IR_FILE)))
    if backend not in ("onnxruntime", "tensorrt"):
        return []
    from colln.export.quantize import selection_crossings

    found = []
    for name in (ONNX_FILE, ORT_FILE):
        if (Path(export_dir) / name).is_file():
            found += [f"{name}: {c}" for c in selection_crossings(onnx.load(str(Path(export_dir) / name)))]
    return found


def validate_backend(
    export_dir: Path,
    backend: str,
    pruned: nn.Module,
    unpruned: nn.Module,
    images: ValImages,
    device: str = "cpu",
    batch: int = 32,
    max_accuracy_drop: float | None = None,
) -> ValidationReport:
    """Validate what ``backend`` deploys from ``export_dir``: the runner every other command opens
    (:func:`colln.infer.runners.open_runner`: ONNX Runtime on the CPU runs the listed
    ``model.ort.onnx`` after its sha256 check, OpenVINO the IR compiled at its recorded precision)
    is the one judged. ONNX Runtime and OpenVINO also run a copy of the graph with the TopK indices
    as extra outputs, read for the kept sets only: extra outputs change what OpenVINO compiles (at
    the bf16 hint, digits_vit keep 0.7 classified 0.9022 with them against 0.9044 as deployed).
    An int8 graph that quantizes the selection (:func:`quantized_selection`) is a mismatch.
    ``max_accuracy_drop``: see :func:`tolerances_for`."""
    spec = read_export(export_dir)
    deployed = open_runner(export_dir, backend, device)
    observer = None
    if backend in KEPT_SET_BACKENDS:
        observer = open_runner(export_dir, backend, device, record_kept=True)
        observer.name = f"{deployed.name}-kept-sets"
    # Judged at the precision of the artifact deployed (export.json's record): OpenVINO's IR at its
    # own (bf16, int8-bf16: judged by their own limits); PyTorch's reference at the export's.
    precision = spec.precision if backend == "torch" else deployed_artifact(export_dir, backend, spec, device).precision
    report = validate(
        pruned,
        unpruned,
        deployed,
        images,
        precision,
        backend=backend,
        batch=batch,
        observer=observer,
        random_weights=spec.weights == "random",
        max_accuracy_drop=max_accuracy_drop,
    )
    if report.tolerances.statistical:
        report.mismatches += [
            f"the int8 graph quantizes the token selection: {c}" for c in quantized_selection(export_dir, backend)
        ]
    return report


@dataclass(frozen=True)
class Findings:
    """Mismatches (each fails the validation) and warnings, in the order they were found."""

    mismatches: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def __add__(
        self,
        other: Findings,
    ) -> Findings:
        return Findings(self.mismatches + other.mismatches, self.warnings + other.warnings)


@dataclass(frozen=True)
class Observed:
    """What the candidate computed, aligned with the reference's outputs (logits; a tokens model's
    rows in patch-id order), and what it reported of its selections: ``kept`` indices per layer
    (None: not reported), ``patch_ids`` per layer whose picks are patch ids already (a tokens
    model's ``indices`` output), ``unobserved`` images whose reported picks may not be the deployed
    graph's (:func:`_differ`), and for tokens how many kept patch ids per image differ from the
    reference's (``id_differences``)."""

    outputs: np.ndarray
    kept: dict[int, np.ndarray] | None = None
    patch_ids: dict[int, np.ndarray] = field(default_factory=dict)
    unobserved: np.ndarray | None = None
    id_differences: np.ndarray | None = None


@dataclass(frozen=True)
class JudgedSelections:
    """The selections judged by the tie rule (:func:`_judge_selections`): the layer checks, the
    images left to judge end to end, the images left out only because a choice the candidate does
    not report is near-tied (see :func:`_agreeing_ties`), and what was found."""

    layers: list[LayerCheck]
    judged: np.ndarray
    tied: np.ndarray
    findings: Findings


@dataclass(frozen=True)
class EndToEnd:
    """A comparator's verdict on the outputs: the images judged in the end, per image the absolute
    errors (one row per image) and cosines, what was found, and for logits the per-image top-1
    agreement with the reference and the quality numbers."""

    judged: np.ndarray
    errors: np.ndarray
    cosines: np.ndarray
    findings: Findings
    top1: np.ndarray | None = None
    unpruned_top1_agreement: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] | None = None
    error_quantiles: dict | None = None


@dataclass(frozen=True)
class Subject:
    """What is validated: the candidate's name, the precision it is judged at and its limits, where
    the images came from and their labels (None: unlabelled), whether the weights are random."""

    backend: str
    precision: str
    source: str
    tolerances: Tolerances
    labels: np.ndarray | None = None
    random_weights: bool = False


@dataclass(frozen=True)
class Runs:
    """Every runner's outputs on the validation images (the unpruned model's and the kept-set copy's:
    None when not run) and the selections PyTorch recorded."""

    reference: dict[str, np.ndarray]
    unpruned: dict[str, np.ndarray] | None
    candidate: dict[str, np.ndarray]
    observer: dict[str, np.ndarray] | None
    selections: list[Selection]

    @property
    def seen(self) -> dict[str, np.ndarray]:
        """The outputs the kept sets are read from: the kept-set copy's, or the candidate's own."""
        return self.observer if self.observer is not None else self.candidate


def validate(
    pruned: nn.Module,
    unpruned: nn.Module,
    candidate: BaseRunner,
    images: ValImages,
    precision: str = "fp32",
    backend: str | None = None,
    batch: int = 32,
    observer: BaseRunner | None = None,
    random_weights: bool = False,
    max_accuracy_drop: float | None = None,
) -> ValidationReport:
    """Run ``candidate`` and the pruned PyTorch model (and, for logits, the unpruned one) on
    ``images``, judge the selections by the tie rule, then the outputs by the comparator of the
    plan's output kind (:data:`COMPARATORS`). ``observer``: a copy of the candidate's graph that also
    outputs the kept indices, read for the kept sets only (None: the candidate's own outputs, where
    it has them). ``random_weights``: the model has random weights (said when too few images can be
    judged). ``max_accuracy_drop``: see :func:`tolerances_for` (logits only)."""
    plan = get_plan(pruned)
    comparator = COMPARATORS[plan.config.output]
    tol = tolerances_for(precision, max_accuracy_drop if comparator.quality else None)
    runs = _run(pruned, unpruned if comparator.quality else None, candidate, observer, images, batch)
    layers = plan.selection_layers
    ref_outputs, ref_unpruned, seen = comparator.observe(plan, runs, tol)
    kept, scores = _recorded(runs.selections, layers)
    errors = _score_errors(pruned, images, batch, kept, scores, layers)
    ref = Reference(ref_outputs, ref_unpruned, kept, scores, _merge_margins(runs.selections), errors)
    subject = Subject(backend or candidate.name, precision, images.source, tol, images.labels, random_weights)
    return _verdict(comparator, ref, seen, layers, plan.config.metric, plan.config.fuse, subject)


def _run(
    pruned: nn.Module,
    unpruned: nn.Module | None,
    candidate: BaseRunner,
    observer: BaseRunner | None,
    images: ValImages,
    batch: int,
) -> Runs:
    """Run the pruned PyTorch model (recording its selections), the ``unpruned`` one when given, the
    candidate and the ``observer`` when given, on the same batches."""
    ref_runner = TorchRunner(pruned, name="torch")
    base_runner = TorchRunner(unpruned, name="torch-unpruned") if unpruned is not None else None
    runners = [r for r in (ref_runner, base_runner, candidate, observer) if r is not None]
    with record_selections(pruned) as selections:
        results = _run_all(runners, list(feeds(images.images, batch)))
    return Runs(
        reference=results[ref_runner.name],
        unpruned=results[base_runner.name] if base_runner is not None else None,
        candidate=results[candidate.name],
        observer=results[observer.name] if observer is not None else None,
        selections=list(selections),
    )


def compare(
    ref: Reference,
    logits: np.ndarray,
    cand_kept: dict[int, np.ndarray] | None,
    layers: Sequence[tuple[int, int]],
    metric: str,
    fuse: bool,
    tolerances: Tolerances,
    labels: np.ndarray | None,
    backend: str,
    precision: str,
    source: str,
    unobserved: np.ndarray | None = None,
    random_weights: bool = False,
) -> ValidationReport:
    """Judge a candidate's logits (and kept sets, when observed) against the PyTorch reference.

    Kept indices point into each layer's candidates, whose order is the previous layer's score
    order; near-tied scores can reorder them without changing the set. So both sides' picks are
    mapped back to patch ids (the fused token gets id ``-1 - layer``) before sets are compared.
    ``unobserved``: per image, the kept sets were read from a copy of the graph that computed other
    outputs (see :func:`_differ`); there near-tied selections are left out as where none is observed."""
    seen = Observed(logits, cand_kept, unobserved=unobserved)
    subject = Subject(backend, precision, source, tolerances, labels, random_weights)
    return _verdict(COMPARATORS["logits"], ref, seen, layers, metric, fuse, subject)


def _verdict(
    comparator: OutputComparator,
    ref: Reference,
    seen: Observed,
    layers: Sequence[tuple[int, int]],
    metric: str,
    fuse: bool,
    subject: Subject,
) -> ValidationReport:
    """The one judgement after the runs: the selections by the tie rule, the outputs by the
    ``comparator``, then the judged-images requirement, into the report."""
    selections = _judge_selections(ref, seen, layers, metric, fuse, subject.tolerances, subject.backend)
    end = comparator.compare(ref, seen, selections, subject)
    return _report(subject, comparator.output, seen.kept is not None, selections, end)


def _report(
    subject: Subject,
    output: str,
    kept_sets_observed: bool,
    selections: JudgedSelections,
    end: EndToEnd,
) -> ValidationReport:
    """The :class:`ValidationReport` of a judgement (the one place it is built), failed where too few
    images were judged end to end."""
    required, too_few = _require_judged(end.judged, subject.random_weights)
    found = selections.findings + end.findings + too_few
    judged, top1 = end.judged, end.top1
    return ValidationReport(
        backend=subject.backend,
        reference="torch",
        precision=subject.precision,
        images=len(judged),
        source=subject.source,
        tolerances=subject.tolerances,
        kept_sets_observed=kept_sets_observed,
        judged_images=int(judged.sum()),
        top1_agreement=float(top1.mean()) if top1 is not None else None,
        top1_agreement_judged=float(top1[judged].mean()) if top1 is not None and judged.any() else None,
        **_error_fields(end.errors, end.cosines, judged),
        layers=selections.layers,
        unpruned_top1_agreement=end.unpruned_top1_agreement,
        accuracy=end.accuracy,
        mismatches=list(found.mismatches),
        warnings=list(found.warnings),
        output=output,
        judged_required=required,
        error_quantiles=end.error_quantiles,
    )


class OutputComparator(Protocol):
    """How one output kind's outputs are compared with the reference's (:data:`COMPARATORS`).
    ``quality``: the unpruned model runs beside for top-1 agreement and accuracy, and the accuracy
    gate (``max_accuracy_drop``) applies."""

    output: str
    quality: bool

    def observe(
        self,
        plan: KeepPlan,
        runs: Runs,
        tol: Tolerances,
    ) -> tuple[np.ndarray, np.ndarray | None, Observed]:
        """The reference's outputs and the unpruned model's (None: not run), aligned for comparison,
        and what the candidate computed and reported."""
        ...

    def compare(
        self,
        ref: Reference,
        seen: Observed,
        selections: JudgedSelections,
        subject: Subject,
    ) -> EndToEnd:
        """Judge the outputs on the images the selections left to judge."""
        ...


@dataclass(frozen=True)
class LogitsComparator:
    """Logits: per image within the tolerances (the int8 rule: their quantiles and top-1 agreement
    over all images), the same top-1 class unless PyTorch's top-2 gap is within the error tolerance,
    and the accuracy drop where labels exist."""

    output: str = "logits"
    quality: bool = True

    def observe(
        self,
        plan: KeepPlan,
        runs: Runs,
        tol: Tolerances,
    ) -> tuple[np.ndarray, np.ndarray | None, Observed]:
        ref = runs.reference[OUTPUT_NAME]
        logits = runs.candidate[OUTPUT_NAME].astype(np.float32)
        unobserved = None
        if runs.observer is not None:
            unobserved = _differ(logits, runs.observer[OUTPUT_NAME].astype(np.float32), ref, tol)
        _, topk_kept, _ = _checked(plan)
        kept = _observed_kept(runs.seen, topk_kept) if topk_kept else None
        return ref, runs.unpruned[OUTPUT_NAME], Observed(logits, kept, unobserved=unobserved)

    def compare(
        self,
        ref: Reference,
        seen: Observed,
        selections: JudgedSelections,
        subject: Subject,
    ) -> EndToEnd:
        tol, logits = subject.tolerances, seen.outputs
        err = np.abs(logits - ref.outputs)
        cos = _cosine(logits, ref.outputs)
        scale = np.maximum(1.0, np.abs(ref.outputs).max(axis=1))
        top1 = _top1(logits, ref.outputs)
        judged, back = selections.judged, Findings()
        if not tol.statistical:
            agree = (cos >= tol.min_cosine) & (err.max(axis=1) <= tol.logit_rtol * scale)
            judged, back = _agreeing_ties(judged, selections.tied, agree)
        quantiles = error_quantiles(err.max(axis=1) / scale, 1.0 - cos, judged)
        found = (
            _judge_statistics(quantiles, float(top1.mean()), tol)
            if tol.statistical
            else _judge_images(ref.outputs, err, cos, top1, judged, tol)
        )
        accuracy, lost = _accuracy(ref, logits, subject)
        unpruned = {
            name: top1_accuracy(x, ref.unpruned.argmax(1)) for name, x in (("torch", ref.outputs), (subject.backend, logits))
        }
        return EndToEnd(judged, err, cos, back + found + lost, top1, unpruned, accuracy, quantiles)


@dataclass(frozen=True)
class TokensComparator:
    """Tokens and dense features: the same kept patch ids, then on the judged images the rows in
    patch-id order (a dense model's rows are the patch grid): max |error| within
    ``logit_rtol * max(1, max |reference|)`` and every row's cosine >= ``min_cosine``. Kept patch-id
    sets go by the tie rule: the inner layers through the graph's TopK outputs where observed, a
    tokens model's final one through its ``indices`` output."""

    output: str
    quality: bool = False

    def observe(
        self,
        plan: KeepPlan,
        runs: Runs,
        tol: Tolerances,
    ) -> tuple[np.ndarray, np.ndarray | None, Observed]:
        dense = self.output == "dense"
        name = FEATURES_NAME if dense else TOKENS_NAME
        grid = np.tile(np.arange(plan.num_patches), (len(runs.reference[name]), 1))

        def rows(out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            # Rows compared by patch id: score order may swap tied kept tokens without changing the set.
            ids = grid if dense else out[INDICES_NAME].astype(np.int64)
            return ids, _by_patch_id(out[name].astype(np.float32), ids)

        ref_ids, ref_rows = rows(runs.reference)
        cand_ids, cand_rows = rows(runs.candidate)
        unobserved = None
        if runs.observer is not None:
            seen_ids, seen_rows = rows(runs.observer)
            unobserved = (_id_differences(seen_ids, cand_ids) > 0) | _differ(cand_rows, seen_rows, ref_rows, tol)
        _, topk_kept, selects = _checked(plan)
        # Inner layers through the graph's TopK outputs; the final selection is the indices output itself.
        seen = Observed(
            cand_rows,
            _observed_kept(runs.seen, topk_kept),
            dict.fromkeys(selects, cand_ids),
            unobserved,
            _id_differences(ref_ids, cand_ids),
        )
        return ref_rows, None, seen

    def compare(
        self,
        ref: Reference,
        seen: Observed,
        selections: JudgedSelections,
        subject: Subject,
    ) -> EndToEnd:
        tol, rows, differ = subject.tolerances, seen.outputs, seen.id_differences
        n, width = len(rows), rows.shape[-1]
        same_ids = differ == 0
        found = _collect(selections.judged & ~same_ids, differ, "kept patch ids that differ despite clear score margins")
        err = np.abs(rows - ref.outputs).reshape(n, -1)
        cos = _cosine(rows.reshape(-1, width), ref.outputs.reshape(-1, width)).reshape(n, -1).min(axis=1)
        limit = tol.logit_rtol * np.maximum(1.0, np.abs(ref.outputs).reshape(n, -1).max(axis=1))
        agree = (cos >= tol.min_cosine) & (err.max(axis=1) <= limit)
        judged, back = _agreeing_ties(selections.judged, selections.tied & same_ids, agree)
        judged = judged & same_ids
        found += _collect(judged & (cos < tol.min_cosine), cos, f"token cosine similarity below {tol.min_cosine:g}", low=True)
        found += _collect(judged & (err.max(axis=1) > limit), err.max(axis=1), "max |token error| above the tolerance")
        return EndToEnd(judged, err, cos, Findings(mismatches=found) + back)


# One comparator per output kind (KeepPlan.config.output).
COMPARATORS: dict[str, OutputComparator] = {
    "logits": LogitsComparator(),
    "tokens": TokensComparator("tokens"),
    "dense": TokensComparator("dense"),
}


def _checked(
    plan: KeepPlan,
) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...], tuple[int, ...]]:
    """What validation checks of the plan's operations, by kind: PyTorch's selection margin at every
    one (``(layer, n)``, n its TopK's K: k kept, ToMe's r merged edges); the candidate's kept set
    where its graph reports it: prune and merge through their TopK outputs (``(layer, k)``, read
    with :func:`colln.export.onnx.with_kept_outputs`), a tokens model's select through its
    ``indices`` output (its layers); ToMe's TopKs rank edges, not kept tokens: nothing to read."""
    return plan.selection_layers, plan.kept_index_layers, tuple(op.layer for op in plan.operations if op.kind == "select")


def _differ(
    deployed: np.ndarray,
    observer: np.ndarray,
    reference: np.ndarray,
    tol: Tolerances,
) -> np.ndarray:
    """Per image: the kept-set copy's outputs are not the deployed graph's within the tolerances
    (scaled by the PyTorch ``reference``). There the two compiled graphs may have kept different
    tokens on a near-tie, so the copy's kept sets do not speak for what was deployed."""
    n = len(deployed)
    d, o = deployed.reshape(n, -1), observer.reshape(n, -1)
    limit = tol.logit_rtol * np.maximum(1.0, np.abs(reference.reshape(n, -1)).max(axis=1))
    return (np.abs(d - o).max(axis=1) > limit) | (_cosine(d, o) < tol.min_cosine)


def _recorded(
    selections: Sequence[Selection],
    layers: Sequence[tuple[int, int]],
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """PyTorch's kept indices and scores per selection layer, batches concatenated."""
    kept: dict[int, list[torch.Tensor]] = {}
    scores: dict[int, list[torch.Tensor]] = {}
    for s in selections:
        kept.setdefault(s.layer, []).append(s.indices)
        scores.setdefault(s.layer, []).append(s.scores)
    return {i: torch.cat(kept[i]).numpy() for i, _ in layers}, {i: torch.cat(scores[i]).float().numpy() for i, _ in layers}


def _score_errors(
    pruned: nn.Module,
    images: ValImages,
    batch: int,
    kept: dict[int, np.ndarray],
    scores: dict[int, np.ndarray],
    layers: Sequence[tuple[int, int]],
) -> dict[int, np.ndarray]:
    """Per selection layer and image, how far PyTorch's fp32 ``scores`` are from the same model's in
    float64 on the same ``images``: ``max |s32 - s64| / max |s64|``, the tie band's floor (see the
    module docstring). An image is measured at a layer while every earlier layer kept the same
    candidates in the same order in both runs (the same tokens scored); where float64 kept others, the
    image gets the largest error measured at that layer (at any layer so far, where no image was)."""
    if not layers:
        return {}
    exact = copy.deepcopy(pruned).double()
    device = next(exact.parameters()).device
    with torch.inference_mode(), record_selections(exact) as selections:
        for feed in feeds(images.images, batch):
            exact(torch.from_numpy(feed[INPUT_NAME]).to(device, torch.float64))
    exact_kept = {i: torch.cat([s.indices for s in selections if s.layer == i]).cpu().numpy() for i, _ in layers}
    exact_scores = {i: torch.cat([s.scores for s in selections if s.layer == i]).cpu().numpy() for i, _ in layers}
    same = np.ones(len(images.images), dtype=bool)
    errors: dict[int, np.ndarray] = {}
    for i, _ in layers:
        s64 = exact_scores[i]
        err = np.abs(scores[i] - s64).max(axis=1) / np.maximum(np.abs(s64).max(axis=1), 1e-30)
        measured = err[same] if same.any() else np.concatenate(list(errors.values()))
        errors[i] = np.where(same, err, measured.max())
        same &= (kept[i] == exact_kept[i]).all(axis=1)
    return errors


def _tie_bands(
    ref: Reference,
    layers: Sequence[tuple[int, int]],
    tol: Tolerances,
) -> dict[int, np.ndarray]:
    """Per selection layer, each image's tie band relative to its top score: ``tie_rtol``, or
    :data:`FP32_TIE_FACTOR` times PyTorch's measured fp32 score error where that is wider."""
    n = len(ref.outputs)
    return {i: np.maximum(tol.tie_rtol, FP32_TIE_FACTOR * ref.score_errors.get(i, np.zeros(n))) for i, _ in layers}


def _band_text(
    tol: Tolerances,
    bands: dict[int, np.ndarray],
    images: np.ndarray | None = None,
) -> str:
    """The tie band in a message: ``tie_rtol 0.0001``, or the widest band of the (``images``) images
    where the measured fp32 error widened it."""
    widest = max((float(np.max(b if images is None else b[images], initial=0.0)) for b in bands.values()), default=0.0)
    if widest <= tol.tie_rtol:
        return f"tie_rtol {tol.tie_rtol:g}"
    return f"a tie band up to {widest:.2g}, {FP32_TIE_FACTOR:g}x torch's fp32 score error"


def _merge_margins(
    selections: Sequence[Selection],
) -> dict[int, np.ndarray]:
    """PyTorch's merge margins per merging layer, batches concatenated (layers that do not merge: none)."""
    margins: dict[int, list[torch.Tensor]] = {}
    for s in selections:
        if s.merge_margin is not None:
            margins.setdefault(s.layer, []).append(s.merge_margin)
    return {i: torch.cat(m).float().numpy() for i, m in margins.items()}


def _observed_kept(
    outs: dict[str, np.ndarray],
    layers: Sequence[tuple[int, int]],
) -> dict[int, np.ndarray] | None:
    """The candidate's kept indices per layer from the graph's extra TopK outputs; None unless it
    reported every layer (ONNX Runtime through :func:`colln.export.onnx.with_kept_outputs`)."""
    from colln.export.onnx import KEPT_OUTPUT_PREFIX

    kept = {
        i: np.concatenate([outs[name] for name in sorted(outs) if name.startswith(f"{KEPT_OUTPUT_PREFIX}{i}_")], axis=1)
        for i, _ in layers
        if f"{KEPT_OUTPUT_PREFIX}{i}_0" in outs
    }
    return kept if len(kept) == len(layers) else None


def _by_patch_id(
    tokens: np.ndarray,
    ids: np.ndarray,
) -> np.ndarray:
    """A tokens output ``[N, K, C]`` with each image's rows in patch-id order."""
    return np.take_along_axis(tokens, np.argsort(ids, axis=1)[..., None], axis=1)


def _run_all(
    runners: Sequence[BaseRunner],
    feeds: list[dict[str, np.ndarray]],
) -> dict[str, dict[str, np.ndarray]]:
    """polygraphy's Comparator runs every runner on the same feeds; outputs concatenated per runner."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(list(runners), data_loader=feeds)
    merged = {}
    for name, iterations in results.items():
        merged[name] = {out: np.concatenate([np.asarray(it[out]) for it in iterations]) for out in iterations[0]}
    return merged


def error_quantiles(
    rel_error: np.ndarray,
    cosine_gap: np.ndarray,
    judged: np.ndarray,
) -> dict[str, dict[str, dict[str, float]] | None]:
    """Median, 99th percentile and max of the per-image relative max |error| (max |error| over
    ``max(1, max |reference|)``) and of ``1 - cosine``, over the ``judged`` images and over all
    (``judged`` is None when no image was judged)."""

    def stats(values: np.ndarray) -> dict[str, float]:
        return {"median": float(np.median(values)), "p99": float(np.quantile(values, 0.99)), "max": float(values.max())}

    def both(mask: np.ndarray) -> dict[str, dict[str, float]]:
        return {"rel_error": stats(rel_error[mask]), "cosine_gap": stats(cosine_gap[mask])}

    return {"judged": both(judged) if judged.any() else None, "all": both(np.ones_like(judged))}


def _judge_statistics(
    quantiles: dict,
    top1_agreement: float,
    tol: Tolerances,
) -> Findings:
    """The int8 rule's end-to-end checks (:attr:`Tolerances.statistical`): top-1 agreement over all
    images, and the median and p99 of the judged images' errors."""
    found = []
    if top1_agreement < tol.min_top1_agreement:
        found.append(f"top-1 agreement with torch {top1_agreement:.4f}, below {tol.min_top1_agreement:g}")
    judged = quantiles["judged"]
    if judged is None:
        return Findings(mismatches=tuple(found))
    limits = {
        ("rel_error", "median"): tol.median_logit_rtol,
        ("rel_error", "p99"): tol.p99_logit_rtol,
        ("cosine_gap", "median"): tol.median_cosine_gap,
        ("cosine_gap", "p99"): tol.p99_cosine_gap,
    }
    what = {"rel_error": "|logit error| / max(1, max|ref|)", "cosine_gap": "1 - cosine similarity"}
    for (quantity, q), limit in limits.items():
        value = judged[quantity][q]
        if value > limit:
            found.append(f"{q} of {what[quantity]} over the judged images {value:.4g}, above {limit:g}")
    return Findings(mismatches=tuple(found))


def _judge_images(
    ref_logits: np.ndarray,
    err: np.ndarray,
    cos: np.ndarray,
    top1: np.ndarray,
    judged: np.ndarray,
    tol: Tolerances,
) -> Findings:
    """The per-image end-to-end checks on the ``judged`` images: cosine, max |logit error| within
    ``logit_rtol * max(1, max |reference logit|)``, and the same top-1 class unless PyTorch's own
    top-1/top-2 gap is within that error tolerance."""
    n = len(ref_logits)
    limit = tol.logit_rtol * np.maximum(1.0, np.abs(ref_logits).max(axis=1))
    top2 = np.sort(ref_logits, axis=1)[:, -2:] if ref_logits.shape[1] > 1 else np.zeros((n, 2))
    gap = top2[:, 1] - top2[:, 0]
    found = (
        _collect(judged & (cos < tol.min_cosine), cos, f"cosine similarity below {tol.min_cosine:g}", low=True)
        + _collect(judged & (err.max(axis=1) > limit), err.max(axis=1), "max |logit error| above the tolerance")
        + _collect(judged & (gap > limit) & ~top1, gap, "different top-1 class despite a clear top-2 gap")
    )
    return Findings(mismatches=found)


def _accuracy(
    ref: Reference,
    logits: np.ndarray,
    subject: Subject,
) -> tuple[dict[str, float] | None, Findings]:
    """Top-1 accuracy on the labels (None without them) of the unpruned model, PyTorch's pruned one
    and the candidate, and a mismatch where the candidate lost more than ``max_accuracy_drop``; a
    warning where that gate is finer than one image (one flipped image then fails it)."""
    labels, backend, tol = subject.labels, subject.backend, subject.tolerances
    if labels is None:
        return None, Findings()
    models = (("unpruned", ref.unpruned), ("torch", ref.outputs), (backend, logits))
    accuracy = {name: top1_accuracy(x, labels) for name, x in models}
    drop = accuracy["torch"] - accuracy[backend]
    coarse = ()
    if tol.max_accuracy_drop is not None and tol.max_accuracy_drop < 1 / len(labels):
        coarse = (
            f"the accuracy gate ({100 * tol.max_accuracy_drop:g} points) is finer than one image of {len(labels)} "
            f"({100 / len(labels):.2f} points): one image the candidate gets wrong and torch right fails it; "
            "validate on more labelled images or raise --max-accuracy-drop",
        )
    if tol.max_accuracy_drop is None or drop <= tol.max_accuracy_drop:
        return accuracy, Findings(warnings=coarse)
    lost = (
        f"accuracy {accuracy[backend]:.4f} vs torch {accuracy['torch']:.4f}: {100 * drop:.1f} points lost, "
        f"more than the {100 * tol.max_accuracy_drop:g} allowed"
    )
    return accuracy, Findings(mismatches=(lost,), warnings=coarse)


def _judge_selections(
    ref: Reference,
    seen: Observed,
    layers: Sequence[tuple[int, int]],
    metric: str,
    fuse: bool,
    tol: Tolerances,
    backend: str,
) -> JudgedSelections:
    """Per selection layer: PyTorch's margins and, when the candidate reports its picks
    (``seen.kept``), kept-set agreement by the tie rule; where it does not, near-tied images are
    left out. Images whose reported picks may not be the deployed graph's (``seen.unobserved``, see
    :func:`_differ`) go by the margin rule too; near-tied merge choices are left out."""
    n = len(ref.outputs)
    rel_margins, checks = {}, []
    bands = _tie_bands(ref, layers, tol)
    for i, k in layers:
        s = torch.from_numpy(ref.scores[i])
        margin = ops.boundary_margin(s, k).numpy()
        rel_margins[i] = margin / np.maximum(s.abs().amax(dim=-1).numpy(), 1e-30)
        error = ref.score_errors.get(i)
        checks.append(
            LayerCheck(
                layer=i,
                k=k,
                min_margin=float(margin.min()),
                min_relative_margin=float(rel_margins[i].min()),
                tied_images=int((rel_margins[i] <= bands[i]).sum()),
                fp32_score_error=float(error.max()) if error is not None else None,
                max_tie_band=float(bands[i].max()),
            )
        )
    near = np.any([rel_margins[i] <= bands[i] for i in rel_margins], axis=0) if layers else np.zeros(n, dtype=bool)
    if seen.kept is None:
        judged, tied, found = ~near, near, Findings(warnings=_unreported(near, backend, _band_text(tol, bands, near)))
    else:
        checks, judged, found = _judge_kept(ref, seen, checks, rel_margins, bands, metric, fuse, tol)
        tied = near & judged & seen.unobserved if seen.unobserved is not None else np.zeros(n, dtype=bool)
        judged = judged & ~tied
        if tied.any():
            found += Findings(
                warnings=(
                    f"{int(tied.sum())} of {n} images have a near-tied selection (relative margin within "
                    f"{_band_text(tol, bands, tied)}) "
                    f"and {backend} as deployed computed other outputs than its copy that reports kept tokens; "
                    "left out of the logit checks unless their outputs agree anyway",
                )
            )
    checks, merge_tied, merges = _judge_merges(ref.merge_margins, checks, judged, tol)
    return JudgedSelections(checks, judged & ~merge_tied, tied | merge_tied, found + merges)


def _unreported(
    near: np.ndarray,
    backend: str,
    band: str,
) -> tuple[str, ...]:
    """The warning for the images left out because ``backend`` does not report a near-tied choice
    (``band``: the tie band, as :func:`_band_text` words it)."""
    if not near.any():
        return ()
    return (
        f"{int(near.sum())} of {len(near)} images have a near-tied selection (relative margin within {band}) "
        f"and {backend} does not report that choice (ONNX Runtime's graph reports kept tokens; no backend reports "
        "ToMe's matching); left out of the logit checks unless their outputs agree anyway",
    )


def _judge_kept(
    ref: Reference,
    seen: Observed,
    checks: list[LayerCheck],
    rel_margins: dict[int, np.ndarray],
    bands: dict[int, np.ndarray],
    metric: str,
    fuse: bool,
    tol: Tolerances,
) -> tuple[list[LayerCheck], np.ndarray, Findings]:
    """The candidate's kept sets layer by layer on the images whose earlier layers agreed (see
    :func:`_kept_check`; ``bands``: each image's tie band per layer, :func:`_tie_bands`). Picks are
    compared as patch ids: each layer's candidates are the previous layer's picks (and the fused
    token, id ``-1 - layer``). Returns the checks, the images that never diverged and what was found."""
    n = len(ref.outputs)
    judged = np.ones(n, dtype=bool)
    found = Findings()
    ids = {side: np.tile(np.arange(ref.scores[checks[0].layer].shape[1]), (n, 1)) for side in ("torch", "cand")} if checks else {}
    out = []
    for check in checks:
        i = check.layer
        picked = {
            "torch": np.take_along_axis(ids["torch"], ref.kept[i], axis=1),
            "cand": seen.patch_ids[i]
            if i in seen.patch_ids
            else np.take_along_axis(ids["cand"], seen.kept[i].astype(np.int64), axis=1),
        }
        check, diverged, more = _kept_check(
            check, ref.scores[i], ids["torch"], picked, judged, rel_margins[i], bands[i], metric, tol
        )
        out.append(check)
        judged, found = judged & ~diverged, found + more
        fused = np.full((n, 1), -1 - i) if fuse else np.zeros((n, 0), dtype=np.int64)
        ids = {side: np.concatenate([picked[side], fused], axis=1) for side in ids}
    # Only the explained divergences are near-ties; the others are mismatches already.
    explained = sum(c.explained or 0 for c in out)
    if explained:
        found += Findings(
            warnings=(
                f"{explained} of {n} images kept a different token set on a near-tie (within {_band_text(tol, bands)}); "
                "left out of the logit checks",
            )
        )
    return out, judged, found


def _judge_merges(
    margins: dict[int, np.ndarray],
    checks: list[LayerCheck],
    judged: np.ndarray,
    tol: Tolerances,
) -> tuple[list[LayerCheck], np.ndarray, Findings]:
    """The images whose merge choice is near-tied at some merging layer (its margin within
    ``tie_rtol``: the backends may pick another destination), to leave out of the end-to-end checks.
    Returns the checks with their merge margins, those of the ``judged`` images it leaves out, and
    the warning."""
    tied = np.zeros_like(judged)
    out = []
    for check in checks:
        m = margins.get(check.layer)
        if m is not None:
            near = m <= tol.tie_rtol
            tied |= near
            check = replace(check, min_merge_margin=float(m.min()), merge_tied_images=int(near.sum()))
        out.append(check)
    left_out = tied & judged
    if not left_out.any():
        return out, left_out, Findings()
    warning = (
        f"{int(left_out.sum())} of {len(judged)} images have a near-tied merge choice (best and second-best destination "
        f"within tie_rtol {tol.tie_rtol:g}); left out of the logit checks unless their outputs agree anyway"
    )
    return out, left_out, Findings(warnings=(warning,))


def _kept_check(
    check: LayerCheck,
    scores: np.ndarray,
    candidates: np.ndarray,
    picked: dict[str, np.ndarray],
    compared: np.ndarray,
    rel_margin: np.ndarray,
    band: np.ndarray,
    metric: str,
    tol: Tolerances,
) -> tuple[LayerCheck, np.ndarray, Findings]:
    """Compare kept sets on the ``compared`` images (those whose earlier layers agreed); a divergence
    here is explained when the tokens only one side kept are all within the tie band (``band``, per
    image relative to its top score) of PyTorch's k-th score (``scores``: PyTorch's, over the layer's
    ``candidates``, as patch ids). Returns the check, the images that diverged here and what was found."""
    i, k = check.layer, check.k
    overlap_all = [
        len(set(t.tolist()) & set(c.tolist())) / max(len(t), len(c)) for t, c in zip(picked["torch"], picked["cand"], strict=True)
    ]
    diverged = np.zeros_like(compared)
    overlaps, explained, worst = [], 0, []
    for b in np.flatnonzero(compared):
        t, c = set(picked["torch"][b].tolist()), set(picked["cand"][b].tolist())
        overlaps.append(len(t & c) / k)
        if t == c:
            continue
        diverged[b] = True
        s = scores[b]
        kth = np.sort(s)[::-1][k - 1]
        if metric == "correct":
            ok, gap = rel_margin[b] <= band[b], float(rel_margin[b])
        else:
            differ = np.isin(candidates[b], list(t ^ c))
            beyond = np.abs(s[differ] - kth).max() - band[b] * np.abs(s).max()
            gap = float(max(beyond, 0.0) / max(np.abs(s).max(), 1e-30))
            ok = gap == 0.0
        explained += ok
        if not ok:
            worst.append((gap, int(b)))
    found = Findings()
    if worst:
        gap, b = max(worst)
        text = (
            f"layer {i}: {len(worst)} image(s) kept tokens outside PyTorch's tie band (worst: image {b}, "
            f"{gap:.2g} of the top score beyond it)"
        )
        # The int8 rule judges the layer by its mean overlap below, not by its worst image.
        found = Findings(warnings=(text,)) if tol.statistical else Findings(mismatches=(text,))
    mean_all = float(np.mean(overlap_all)) if overlap_all else None
    if tol.statistical and mean_all is not None and mean_all < tol.min_mean_overlap:
        found += Findings(
            mismatches=(f"layer {i}: mean kept-set overlap with torch {mean_all:.4f}, below {tol.min_mean_overlap:g}",)
        )
    n_compared, n_diverged = int(compared.sum()), int(diverged.sum())
    check = replace(
        check,
        compared_images=n_compared,
        mean_overlap=float(np.mean(overlaps)) if overlaps else None,
        identical_fraction=float(1 - n_diverged / n_compared) if n_compared else None,
        diverged_here=n_diverged,
        explained=explained,
        mean_overlap_all=mean_all,
        outside_band=len(worst),
    )
    return check, diverged, found


def required_judged(
    images: int,
) -> int:
    """The fewest judged images a pass needs out of ``images``: :data:`MIN_JUDGED_FRACTION` of them
    and at least :data:`MIN_JUDGED_IMAGES` (all of them when fewer are validated)."""
    return max(math.ceil(MIN_JUDGED_FRACTION * images), min(MIN_JUDGED_IMAGES, images))


def _agreeing_ties(
    judged: np.ndarray,
    tied: np.ndarray,
    agree: np.ndarray,
) -> tuple[np.ndarray, Findings]:
    """Judge the images left out only for a near-tied choice the candidate does not report (``tied``)
    whose outputs agree with the reference within the per-image tolerances anyway (``agree``): the
    tie left out the images where a flipped choice could explain a difference, and these show none;
    judged, they count towards the images a pass needs. Those that differ stay left out."""
    back = tied & ~judged & agree
    if not back.any():
        return judged, Findings()
    warning = f"{int(back.sum())} of those images with a near-tied choice agree with torch within the tolerances anyway: judged"
    return judged | back, Findings(warnings=(warning,))


def _require_judged(
    judged: np.ndarray,
    random_weights: bool,
) -> tuple[int, Findings]:
    """Fail a validation that judged too few images end to end (the rest left out as near-ties, or
    already mismatched): the logit checks then cover too little to call it a pass. Returns the
    number required and the mismatch, if any."""
    n, got = len(judged), int(judged.sum())
    need = required_judged(n)
    if got >= need:
        return need, Findings()
    why = (
        "random weights attend almost uniformly, so their selections are near-ties: validate trained weights"
        if random_weights
        else "the others were left out of the logit checks (see the warnings and mismatches): validate on more "
        "images, or at a precision with fewer near-ties"
    )
    return need, Findings(mismatches=(f"too few images judged end to end: {got} of {n}, at least {need} needed; {why}",))


def _collect(
    bad: np.ndarray,
    values: np.ndarray,
    what: str,
    low: bool = False,
) -> tuple[str, ...]:
    """The mismatch for the ``bad`` images, naming the worst by ``values`` (the lowest when ``low``)."""
    idx = np.flatnonzero(bad)
    if not len(idx):
        return ()
    worst = idx[np.argmin(values[idx])] if low else idx[np.argmax(values[idx])]
    return (f"{len(idx)} image(s) with {what} (worst: image {worst}, {values[worst]:.6g})",)


def _id_differences(
    ids: np.ndarray,
    other: np.ndarray,
) -> np.ndarray:
    """Per image, how many of the kept patch ids differ between two selections (as sets)."""
    return (np.sort(ids, axis=1) != np.sort(other, axis=1)).sum(axis=1)


def _cosine(
    a: np.ndarray,
    b: np.ndarray,
) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.where(den > 0, (a64 * b64).sum(1) / np.maximum(den, 1e-300), 1.0)


def _top1(
    logits: np.ndarray,
    target: np.ndarray,
) -> np.ndarray:
    """Per image: ``logits``' top-1 class is ``target``'s (a label per image, or other logits' top-1)."""
    return logits.argmax(1) == (target if target.ndim == 1 else target.argmax(1))
