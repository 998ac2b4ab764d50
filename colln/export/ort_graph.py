"""The ONNX Runtime flavour of an exported graph: the attention that ONNX Runtime's optimizer leaves
as separate ops, fused into its ``com.microsoft.MultiHeadAttention``.

The exported ``model.onnx`` stays plain ONNX (TensorRT parses it). :func:`for_onnxruntime` is
applied where colln opens an ONNX Runtime CPU session (:func:`colln.infer.runners.session_model`),
so validation, timing and colln-serve all run it; unpruned baselines too, so speedups compare like
with like. colln-triton's onnxruntime entries ship it on the CPU (the export's ``model.ort.onnx``)
and the plain graph on a GPU, where the fused op has not been tried.

Why: ONNX Runtime runs a block's plain attention as a dozen ops (slices of the packed q/k/v,
transposes into heads and back, two products, softmax), and its transposes run on one thread.
The fused op does the same arithmetic with the same MLAS kernels (outputs are bit-identical on
deit_small) in one parallel pass: deit_small, batch 8, 2 threads, pruned int8 1.05-1.15x faster
(benchmarks/README.md). Blocks that prune keep the plain form: their softmax output feeds the
Col-Ln score, which the fused op does not expose.

The match is exact or nothing: the form colln exports (timm's non-fused path, see
:func:`colln.models.rewrite.explicit_attention`), written as an onnxscript rewriter pattern
(:class:`_PackedAttention`: ops, permutations and the head-slice constants; the pattern only
matches where every intermediate tensor is read inside it, so a softmax that also feeds the score
is not fused); any other form is left as it is (correct, just not fused).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxscript import ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._ir_utils import get_numpy_value

MS_DOMAIN = "com.microsoft"
HEAD_SPLIT_PERM = [2, 0, 3, 1, 4]  # [B, N, 3, H, D] -> [3, B, H, N, D]
KEY_TRANSPOSE_PERM = [0, 1, 3, 2]
HEAD_MERGE_PERM = [0, 2, 1, 3]  # [B, H, N, D] -> [B, N, H, D]


def for_onnxruntime(
    proto: onnx.ModelProto,
) -> tuple[onnx.ModelProto, int]:
    """A copy of ``proto`` whose non-pruning attentions run as ``MultiHeadAttention``, and how many
    were fused (0: an unchanged copy)."""
    model = ir.serde.deserialize_model(proto)
    # The bias form first: both anchor on the same output Reshape.
    rules = pattern.RewriteRuleSet([_PackedAttention.rule(bias=True), _PackedAttention.rule(bias=False)], commute=True)
    count = rules.apply_to_model(model)
    if not count:
        unchanged = onnx.ModelProto()
        unchanged.CopyFrom(proto)
        return unchanged, 0
    ir.passes.common.RemoveUnusedNodesPass()(model)
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    return ir.serde.serialize_model(model), count


def _ints(
    value: ir.Value | None,
) -> list[int] | None:
    array = get_numpy_value(value)
    return None if array is None else [int(v) for v in array.reshape(-1)]


class _PackedAttention(pattern.RewriteRuleClassBase):
    """``Reshape(Transpose(softmax(q * scale @ k^T) @ v))`` with q, k, v sliced from one packed
    ``[B, N, 3C]`` projection (``product + bias`` when ``bias``: the bias moves into the fused op)
    -> ``Split`` + ``MultiHeadAttention``."""

    def __init__(
        self,
        bias: bool,
    ) -> None:
        super().__init__(name=f"colln_mha_{'bias' if bias else 'packed'}")
        self._bias = bias

    def pattern(self, op, packed, bias, shape, s0, e0, a0, z0, s1, e1, a1, z1, s2, e2, a2, z2, scale, out_shape):
        return self.attention(op, packed, bias, shape, (s0, e0, a0, z0), (s1, e1, a1, z1), (s2, e2, a2, z2), scale, out_shape)[0]

    def attention(self, op, packed, bias, shape, q_slice, k_slice, v_slice, scale, out_shape):
        """The matched subgraph: its output and its softmax's probabilities (``probs``)."""
        source = op.Add(packed, bias) if self._bias else packed
        heads = op.Transpose(op.Reshape(source, shape, _allow_other_attributes=True), perm=HEAD_SPLIT_PERM)
        q, k, v = (op.Squeeze(op.Slice(heads, s, e, a), z) for s, e, a, z in (q_slice, k_slice, v_slice))
        scores = op.MatMul(op.Mul(q, scale), op.Transpose(k, perm=KEY_TRANSPOSE_PERM))
        probs = op.Softmax(scores, _allow_other_attributes=True, _outputs=["probs"])
        merged = op.Transpose(op.MatMul(probs, v), perm=HEAD_MERGE_PERM)
        return op.Reshape(merged, out_shape, _allow_other_attributes=True), probs

    def check(self, context, bias, shape, scale, out_shape, probs, **slices) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if probs.producer().attributes.get_int("axis", -1) not in (-1, 3):
            return result.fail("softmax over another axis")
        dims = _ints(shape)
        if dims is None or len(dims) != 5 or dims[2] != 3 or min(dims[1:]) <= 0:
            return result.fail("not a packed [B, N, 3, H, D] split")
        for i in range(3):
            parts = [_ints(slices[f"{name}{i}"]) for name in "seaz"]
            if parts != [[i], [i + 1], [0], [0]]:
                return result.fail(f"slice {i} is not head {i} of the packed axis")
        if (value := get_numpy_value(scale)) is None or value.size != 1:
            return result.fail("scale is not a constant scalar")
        out = _ints(out_shape)
        if out is None or len(out) != 3 or out[2] != dims[3] * dims[4]:
            return result.fail("output is not [B, N, H * D]")
        if self._bias and (get_numpy_value(bias) is None or list(get_numpy_value(bias).shape) != [3 * dims[3] * dims[4]]):
            return result.fail("bias is not a constant [3C]")
        return result

    def rewrite(self, op, packed, bias, shape, scale, **_):
        inputs, attributes = self.fused_inputs(op, packed, bias, shape, scale)
        return op.MultiHeadAttention(*inputs, **attributes, _domain=MS_DOMAIN)

    def fused_inputs(self, op, packed, bias, shape, scale) -> tuple[list, dict]:
        """``MultiHeadAttention``'s inputs (q, k, v split from the packed tensor; the bias) and its
        ``num_heads`` and ``scale``."""
        heads, head_dim = _ints(shape)[3:]
        sizes = op.initializer(ir.tensor(np.array([heads * head_dim] * 3, dtype=np.int64)), name=f"{packed.name}_mha_sizes")
        # Named after the packed tensor (one per attention): the rewriter's own names (val_1, ...) can
        # collide with the exporter's.
        q, k, v = op.Split(packed, sizes, axis=-1, _outputs=[f"{packed.name}_mha_{part}" for part in "qkv"])
        inputs = [q, k, v, bias] if self._bias else [q, k, v]
        return inputs, {"num_heads": heads, "scale": float(get_numpy_value(scale).reshape(-1)[0])}
