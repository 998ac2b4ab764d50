"""The graph forms colln writes for ONNX Runtime to fuse: GELU in the form its optimizer fuses, and
colln's own fusion of the non-pruning attentions into ``MultiHeadAttention``; both checked against
the plain graph and the PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from colln.export.onnx import export_onnx, gelu_for_fusion
from colln.export.ort_graph import HEAD_SPLIT_PERM, for_onnxruntime
from colln.export.spec import ONNX_FILE, ExportSpec
from colln.infer.runners import session_model
from colln.models import bundled


def _run(
    model: onnx.ModelProto,
    x: np.ndarray,
    optimize: bool = True,
    optimized_path: Path | None = None,
) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _op_types(
    path: Path,
) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _exporters_gelu() -> onnx.ModelProto:
    """torch's exact GELU as the ONNX exporter writes it: ``x * (0.5 * (1 + erf(x / sqrt(2))))``."""
    values = {"sqrt2": 2**0.5, "one": 1.0, "half": 0.5}
    consts = [numpy_helper.from_array(np.array(v, dtype=np.float32), name=n) for n, v in values.items()]
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["half", "a"], ["h"]),
        helper.make_node("Mul", ["x", "h"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        consts,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_gelu_is_rewritten_to_the_form_onnx_runtime_fuses(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32) * 4
    exporters = _exporters_gelu()
    _run(exporters, x, optimized_path=tmp_path / "before.onnx")
    assert "Erf" in _op_types(tmp_path / "before.onnx")  # the exporter's form is not fused
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(exporters)
    assert gelu_for_fusion(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    fused = _run(rewritten, x, optimized_path=tmp_path / "after.onnx")
    assert "Erf" not in _op_types(tmp_path / "after.onnx") and "Gelu" in _op_types(tmp_path / "after.onnx")
    # The same numbers as plain ops (scaling by 0.5 is exact), and as torch's GELU.
    np.testing.assert_array_equal(_run(rewritten, x, optimize=False), _run(exporters, x, optimize=False))
    np.testing.assert_allclose(fused, torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_gelu_rewrite_leaves_other_forms_alone() -> None:
    model = _exporters_gelu()
    next(t for t in model.graph.initializer if t.name == "half").CopyFrom(
        numpy_helper.from_array(np.array(0.25, dtype=np.float32), name="half")
    )
    before = model.SerializeToString()
    assert gelu_for_fusion(model) == 0
    assert model.SerializeToString() == before


def test_exported_gelus_all_fuse(digits_export: Path, tmp_path: Path) -> None:
    """Every GELU the exporter writes for a timm ViT reaches ONNX Runtime as one fused op."""
    proto = onnx.load(str(digits_export / ONNX_FILE))
    x = np.zeros((1, 3, 32, 32), dtype=np.float32)
    _run(proto, x, optimized_path=tmp_path / "optimized.onnx")
    ops = _op_types(tmp_path / "optimized.onnx")
    assert "Erf" not in ops and ops.count("BiasGelu") + ops.count("Gelu") == 8


def _digit_batch(count: int) -> np.ndarray:
    from colln.data import preprocess

    return preprocess(bundled.load_split("test").images[:count], bundled.create_model()).numpy()


def test_every_non_pruning_attention_is_fused(digits_export: Path) -> None:
    """digits_vit has 8 blocks and prunes in 2, 4, 6: the other 5 attentions become
    MultiHeadAttention, the pruning ones keep their softmax (it feeds the Col-Ln score)."""
    proto = onnx.load(str(digits_export / ONNX_FILE))
    fused, count = for_onnxruntime(proto)
    ops = [n.op_type for n in fused.graph.node]
    assert count == ops.count("MultiHeadAttention") == 5 and ops.count("Softmax") == 3
    assert not any(n.op_type == "MultiHeadAttention" for n in proto.graph.node)  # the input is not modified
    x = _digit_batch(6)
    with torch.no_grad():
        reference = ExportSpec.read(digits_export).load_pruned()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(fused, x), reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_run(fused, x), _run(proto, x), rtol=1e-5, atol=1e-5)


def test_attention_forms_not_matched_exactly_are_left_alone(digits_export: Path, tmp_path: Path) -> None:
    """The fusion needs every step of the form colln exports. The exporter's decomposition of fused
    SDPA (timm's default path) is not it, and neither is a head split with another permutation."""
    model = bundled.create_model().eval()
    sdpa = export_onnx(model, tmp_path / "sdpa.onnx", input_size=(3, 32, 32))
    assert for_onnxruntime(sdpa)[1] == 0
    proto = onnx.load(str(digits_export / ONNX_FILE))
    split = next(n for n in proto.graph.node if n.op_type == "Transpose" and list(n.attribute[0].ints) == HEAD_SPLIT_PERM)
    split.attribute[0].ints[:] = [2, 0, 1, 3, 4]
    assert for_onnxruntime(proto)[1] == 4


def test_onnx_runtime_sessions_load_the_fused_graph_on_cpu(digits_export: Path) -> None:
    path = digits_export / ONNX_FILE

    def ops(model: str | bytes) -> list[str]:
        return [n.op_type for n in onnx.load_from_string(model).graph.node]

    assert ops(session_model(path, fuse=True)).count("MultiHeadAttention") == 5
    assert "MultiHeadAttention" not in ops(session_model(path, fuse=False))


@pytest.mark.parametrize("fused", [True, False])
def test_explicit_attention_is_undone_on_exit(fused: bool) -> None:
    from colln.models.rewrite import explicit_attention

    model = bundled.create_model()
    for block in model.blocks:
        block.attn.fused_attn = fused
    with explicit_attention(model):
        assert not any(block.attn.fused_attn for block in model.blocks)
    assert all(block.attn.fused_attn is fused for block in model.blocks)
