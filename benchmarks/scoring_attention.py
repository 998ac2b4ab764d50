"""Tried and not shipped: the pruning blocks' attention on ONNX Runtime CPU as ``MultiHeadAttention``
too, with the op's q·kᵀ output (its optional 4th, before the softmax) feeding the score's softmax.
Efficiency before and after, each paired with the unpruned model, in one interleaved run.

    python benchmarks/scoring_attention.py EXPORT_DIR [--batch 1,8] [--rounds 40] [--warmup 5] [--threads 2] [--json FILE]
As run for docs/benchmarks.md#where-batch-1-time-goes (export: ``colln-export deit_small --weights
random --keep 0.7 --openvino --no-latency``, its unpruned counterpart from the baseline cache):
    python benchmarks/scoring_attention.py /tmp/colln-bench/deit_small-colln-keep0.7-openvino --batch 1 \
        --rounds 50 --warmup 3 --threads 2 --json benchmarks/results/scoring_attention_deit_small.json

Variants, all from the export's ``model.onnx`` and its unpruned counterpart's: ``unpruned`` (every
attention fused, what colln runs), ``unpruned-plain`` (model.onnx as it is), ``pruned-plain``,
``pruned-before`` (:func:`colln.export.ort_graph.for_onnxruntime`, as shipped: the nine other
attentions fused) and ``pruned-after`` (also the three pruning blocks', by :class:`ScoredAttention`).
Efficiency = speedup over the unpruned model of the same form / the keep plan's FLOPs bound. The
outputs of before and after are compared first (the logits, and every TopK's indices, on noise images).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxscript import ir
from onnxscript.rewriter import pattern

from colln.app.cli import parse_ints
from colln.export.artifact import read_export
from colln.export.ort_graph import (
    MS_DOMAIN,
    _PackedAttention,
    for_onnxruntime,
)
from colln.export.spec import INPUT_NAME, ONNX_FILE
from colln.export.unpruned import default_cache, unpruned_export
from colln.infer.environment import environment
from colln.infer.runners import onnxruntime_runner
from colln.infer.timing import Timing, measure, paired_speedup

PAIRS = {"pruned-plain": "unpruned-plain", "pruned-before": "unpruned", "pruned-after": "unpruned"}


class ScoredAttention(_PackedAttention):
    """:class:`colln.export.ort_graph._PackedAttention` where the softmax also feeds the score: the
    attention becomes ``MultiHeadAttention`` and the score reads ``Softmax`` of its q·kᵀ output."""

    def __init__(
        self,
        bias: bool,
    ) -> None:
        super().__init__(bias)
        self.name = f"{self.name}_scored"

    def pattern(self, op, packed, bias, shape, s0, e0, a0, z0, s1, e1, a1, z1, s2, e2, a2, z2, scale, out_shape):
        return self.attention(op, packed, bias, shape, (s0, e0, a0, z0), (s1, e1, a1, z1), (s2, e2, a2, z2), scale, out_shape)

    def rewrite(self, op, packed, bias, shape, scale, **_):
        inputs, attributes = self.fused_inputs(op, packed, bias, shape, scale)
        names = [f"{packed.name}_mha_{part}" for part in ("out", "present_key", "present_value", "qk")]
        out, _, _, qk = op.MultiHeadAttention(*inputs, **attributes, _domain=MS_DOMAIN, _outputs=names)
        qk.type = packed.type  # the op's qk type is its own type parameter: ONNX Runtime cannot infer it
        return out, op.Softmax(qk, axis=-1)


def scored(
    proto: onnx.ModelProto,
) -> onnx.ModelProto:
    """``proto`` (already through :func:`for_onnxruntime`) with its pruning blocks' attention fused too."""
    model = ir.serde.deserialize_model(proto)
    count = pattern.RewriteRuleSet(
        [ScoredAttention.rule(bias=True), ScoredAttention.rule(bias=False)], commute=True
    ).apply_to_model(model)
    assert count, "no pruning block's attention matched"
    ir.passes.common.RemoveUnusedNodesPass()(model)
    fused = ir.serde.serialize_model(model)
    for node in fused.graph.node:
        if node.op_type == "MultiHeadAttention" and len(node.output) == 4:
            # Unnamed: the op then writes no copy of k and v (its key/value cache).
            node.output[1] = node.output[2] = ""
    return fused


def graphs(
    export_dir: Path,
) -> dict[str, onnx.ModelProto]:
    spec = read_export(export_dir)
    pruned = onnx.load(str(Path(export_dir) / ONNX_FILE))
    unpruned = onnx.load(str(unpruned_export(spec, default_cache(export_dir)) / ONNX_FILE))
    return {
        "unpruned": for_onnxruntime(unpruned)[0],
        "unpruned-plain": unpruned,
        "pruned-plain": pruned,
        "pruned-before": for_onnxruntime(pruned)[0],
        "pruned-after": scored(for_onnxruntime(pruned)[0]),
    }


def agreement(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    images: np.ndarray,
) -> dict:
    """Max |logits difference| and whether every TopK's indices agree, before vs after."""

    def run(model: onnx.ModelProto) -> list[np.ndarray]:
        probed = onnx.ModelProto()
        probed.CopyFrom(model)
        indices = [n.output[1] for n in probed.graph.node if n.op_type == "TopK"]
        probed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in indices)
        session = ort.InferenceSession(probed.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {INPUT_NAME: images})

    a, b = run(before), run(after)
    return {
        "images": len(images),
        "logits_max_abs_diff": float(np.abs(a[0] - b[0]).max()),
        "logits_identical": bool(np.array_equal(a[0], b[0])),
        "topk_indices_identical": all(np.array_equal(x, y) for x, y in zip(a[1:], b[1:], strict=True)),
    }


def _chw(
    model: onnx.ModelProto,
) -> tuple[int, ...]:
    image = next(i for i in model.graph.input if i.name == INPUT_NAME)
    return tuple(d.dim_value for d in image.type.tensor_type.shape.dim[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=Timing.warmup)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    spec = read_export(args.export)
    plan = spec.keep_plan()
    bound = plan.flops().bound
    models = graphs(args.export)
    chw = _chw(models["pruned-plain"])
    images = np.random.default_rng(0).standard_normal((8, *chw), dtype=np.float32)
    agree = agreement(models["pruned-before"], models["pruned-after"], images)
    print(f"before vs after: {agree}")
    timing = Timing(rounds=args.rounds, warmup=args.warmup, threads=args.threads)
    load_before = os.getloadavg()
    rows: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        # Graphs already in their ONNX Runtime form: the runner's own fusion finds nothing more to do.
        runners = {
            name: stack.enter_context(onnxruntime_runner(model, threads=timing.threads, split_batches=timing.split_batches))
            for name, model in models.items()
        }
        for b, compared in measure(runners, chw, parse_ints(args.batch, "--batch"), timing, baseline="unpruned").items():
            print(f"batch {b}, onnxruntime, interleaved, {timing.describe()}, bound {bound:.3f}x:")
            rows[str(b)] = {}
            times = compared.times
            for pruned, unpruned in PAIRS.items():
                speedup, lo, hi = paired_speedup(times[unpruned], times[pruned])
                rows[str(b)][pruned] = {
                    "baseline": unpruned,
                    "p50_ms": compared.stats[pruned].p50_ms,
                    "baseline_p50_ms": compared.stats[unpruned].p50_ms,
                    "speedup": speedup,
                    "speedup_iqr": [lo, hi],
                    "efficiency": speedup / bound,
                    "efficiency_iqr": [lo / bound, hi / bound],
                }
                print(
                    f"  {pruned:>14} / {unpruned:<14}: p50 {compared.stats[pruned].p50_ms:8.2f} /"
                    f" {compared.stats[unpruned].p50_ms:8.2f} ms  speedup {speedup:.3f}x (IQR {lo:.3f}-{hi:.3f})"
                    f"  efficiency {speedup / bound:.3f} (IQR {lo / bound:.3f}-{hi / bound:.3f})"
                )
            speedup, lo, hi = paired_speedup(times["pruned-before"], times["pruned-after"])
            rows[str(b)]["after_over_before"] = {"speedup": speedup, "speedup_iqr": [lo, hi]}
            print(f"  pruned-after over pruned-before: {speedup:.3f}x (IQR {lo:.3f}-{hi:.3f})")
    if args.json:
        record = {
            "export": str(args.export),
            "model": spec.model,
            "plan": plan.token_steps,
            "bound": bound,
            "timing": timing.describe(),
            "agreement": agree,
            "batches": rows,
            "environment": environment("onnxruntime", timing.threads, load_before),
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
