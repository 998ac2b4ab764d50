"""colln's one precision vocabulary: every precision name an export, a runtime or a tolerance row
uses, which graph each runs, on which runtimes, and with which OpenVINO hint.

An export's ``--precision`` names its graph (``fp32``, ``fp16``, ``int8``: :data:`GRAPH_PRECISIONS`).
ONNX Runtime and TensorRT run the graph at its own precision; OpenVINO chooses at compile time (an
inference precision hint): an fp32 IR runs at ``fp32`` or ``bf16``, an NNCF int8 IR at ``int8`` or
``int8-bf16`` (what NNCF left float at the bf16 hint). Validation judges each by its own tolerance
row (:data:`colln.verify.validate.TOLERANCES`, keyed by :attr:`Precision.tolerance`).
"""

from __future__ import annotations

from dataclasses import dataclass

from colln.errors import UsageError

# What runs an export's graph at the graph's own precision: "onnx" names the portable graph itself
# (what ONNX Runtime runs on a GPU, or where no fused flavour is listed), and the runtimes.
GRAPH_RUNNERS = ("onnx", "onnxruntime", "tensorrt")
ALL = (*GRAPH_RUNNERS, "openvino")


@dataclass(frozen=True)
class Precision:
    """One precision name: the ``graph`` precision it runs (the export's ``--precision``), the
    ``runtimes`` that run it, the validation ``tolerance`` row it is judged by, and OpenVINO's
    ``INFERENCE_PRECISION_HINT`` for it (``None`` where OpenVINO does not run it)."""

    name: str
    graph: str
    runtimes: tuple[str, ...]
    tolerance: str
    openvino_hint: str | None = None


VOCABULARY = {
    p.name: p
    for p in (
        Precision("fp32", graph="fp32", runtimes=ALL, tolerance="fp32", openvino_hint="f32"),
        Precision("fp16", graph="fp16", runtimes=GRAPH_RUNNERS, tolerance="fp16"),
        # OpenVINO's bf16 inference of the fp32 IR (8-bit mantissa, fp32 accumulation).
        Precision("bf16", graph="fp32", runtimes=("openvino",), tolerance="bf16", openvino_hint="bf16"),
        # What NNCF left float runs at the f32 hint.
        Precision("int8", graph="int8", runtimes=ALL, tolerance="int8", openvino_hint="f32"),
        # The int8 IR with what NNCF left float at the bf16 hint: OpenVINO's own default on CPUs
        # with bf16; judged by int8's rule.
        Precision("int8-bf16", graph="int8", runtimes=("openvino",), tolerance="int8", openvino_hint="bf16"),
    )
}
# What colln-export's --precision takes: the graph precisions.
GRAPH_PRECISIONS = tuple(n for n, p in VOCABULARY.items() if p.graph == n)


def runs_on(
    runtime: str,
) -> tuple[str, ...]:
    """The precision names ``runtime`` runs, in vocabulary order (OpenVINO: fp32, bf16, int8, int8-bf16)."""
    return tuple(n for n, p in VOCABULARY.items() if runtime in p.runtimes)


def precision(
    name: object,
    runtime: str | None = None,
) -> Precision:
    """The vocabulary entry ``name``; a UsageError naming the choices when colln has no such
    precision, or ``runtime`` does not run it."""
    choices = runs_on(runtime) if runtime is not None else tuple(VOCABULARY)
    if name not in choices:
        on = f" on {runtime}" if runtime is not None else ""
        raise UsageError(f"precision {name!r} is not one colln runs{on}: use {', '.join(choices)}")
    return VOCABULARY[name]


def graph_precisions(
    runtime: str,
    graph: str,
) -> tuple[str, ...]:
    """The precisions ``runtime`` runs from a ``graph`` of that precision (OpenVINO runs an int8 IR
    at int8 or int8-bf16)."""
    return tuple(n for n in runs_on(runtime) if VOCABULARY[n].graph == graph)


def stack_precisions(
    runtime: str,
    graph: str,
) -> tuple[str, ...]:
    """The precisions ``runtime`` runs in the variant stack of a ``graph``-precision export: those
    of its fp32 counterpart and those of the export's own graph (ONNX Runtime, int8: fp32 and int8;
    OpenVINO, int8: fp32, bf16, int8, int8-bf16). A UsageError when ``runtime`` runs no such graph."""
    if not graph_precisions(runtime, graph):
        graphs = sorted({VOCABULARY[n].graph for n in runs_on(runtime)})
        raise UsageError(f"{runtime} runs stacks of {' and '.join(graphs)} exports, not {graph}: export {' or '.join(graphs)}")
    return tuple(n for n in runs_on(runtime) if VOCABULARY[n].graph in ("fp32", graph))
