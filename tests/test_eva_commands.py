"""Every colln command on a RoPE family: the bundled ``digits_eva`` (a trained timm Eva: rotary
positions, separate q/k/v, SwiGLU, LayerScale, a register token) exported fp32 / int8 / merged /
ToMe / dense and validated in ONNX Runtime and OpenVINO, parsed and built by TensorRT(-RTX), and
run through colln-eval, colln-finetune and colln-viz. References are independent of the code under
test: accuracies recomputed here from a plain ONNX Runtime session or the PyTorch model, Col-Ln
scores written out from softmax(q k^T), the rotary attention's ONNX Runtime flavour against torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_families import _probs

import colln
from colln.app.eval_cli import main as eval_main
from colln.app.export_cli import main as export_main
from colln.app.finetune_cli import main as finetune_main
from colln.app.viz_cli import main as viz_main
from colln.data import preprocess, validation_images
from colln.export.onnx import export_onnx, topk_constants
from colln.export.ort_graph import for_onnxruntime
from colln.export.quantize import selection_crossings
from colln.export.spec import ONNX_FILE, ExportSpec
from colln.models import bundled
from colln.models.registry import load_model
from colln.models.rewrite import explicit_attention
from colln.report.viz import view
from colln.train import checkpoint as ckpt

NAME = bundled.EVA_NAME
VAL = 96  # validation images per export: enough judged images, a few seconds each
LAYERS = (2, 4, 6)  # EViT's quarter points of 8 blocks
QUICK = ["--no-latency", "--val-limit", str(VAL)]


@pytest.fixture(scope="module")
def eva() -> torch.nn.Module:
    return load_model(NAME).eval()


@pytest.fixture(scope="module")
def val(eva) -> tuple[np.ndarray, np.ndarray]:
    """VAL digits test images, as colln-export validates on them (spread over the split), and their labels."""
    found = validation_images(NAME, eva, None, VAL)
    return found.images, found.labels


def _export(out: Path, *flags: str) -> dict:
    assert export_main([NAME, *flags, *QUICK, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def _judged(v: dict) -> None:
    """Passed on judged images, as many as the rule asks for (not a pass on near-ties alone)."""
    assert v["passed"] and v["images"] == VAL and not v["mismatches"]
    assert v["judged_images"] >= v["judged_required"] >= VAL // 2


def _ort_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 of the written graph in a plain ONNX Runtime session (not colln's runner)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float((logits.argmax(-1) == labels).mean())


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory) -> Path:
    """``colln-export digits_eva --keep 0.7 --openvino``: ONNX Runtime and OpenVINO validated."""
    out = tmp_path_factory.mktemp("eva") / "fp32"
    _export(out, "--keep", "0.7", "--openvino")
    return out


def test_fp32_export_validates_in_onnx_runtime_and_openvino(fp32_export, eva, val) -> None:
    report = json.loads((fp32_export / "report.json").read_text())
    images, labels = val
    spec = ExportSpec.read(fp32_export)
    plan = spec.keep_plan()
    assert plan.layers == LAYERS and list(plan.keep_counts) == [45, 32, 23]
    # Static shapes: every TopK's K is a constant, the plan's.
    assert topk_constants(onnx.load(str(fp32_export / ONNX_FILE))) == list(plan.keep_counts)
    for v in (report["validation"], report["openvino"]["validation"]):
        _judged(v)
        assert v["kept_sets_observed"] and all(layer["identical_fraction"] == 1.0 for layer in v["layers"])
    # The accuracies reported, recomputed here: the graph in a plain session, the pruned PyTorch model.
    accuracy = report["validation"]["accuracy"]
    assert accuracy["onnxruntime"] == _ort_accuracy(fp32_export / ONNX_FILE, images, labels)
    with torch.no_grad():
        pruned = colln.prune(eva, keep=0.7, layers=LAYERS)(torch.from_numpy(images)).argmax(-1).numpy()
    assert accuracy["torch"] == float((pruned == labels).mean()) == report["openvino"]["validation"]["accuracy"]["openvino"]
    assert accuracy["torch"] >= 0.85


def test_int8_export_quantizes_every_product_and_keeps_rope_and_selection_float(tmp_path, eva, val) -> None:
    out = tmp_path / "int8"
    # Calibrated on the VAL images. One image of 96 is 1.04 accuracy points, coarser than the
    # default 0.5-point gate: allow one lost image.
    report = _export(out, "--keep", "0.7", "--precision", "int8", "--max-accuracy-drop", "1.1")
    _judged(report["validation"])
    images, labels = val
    assert report["validation"]["accuracy"]["onnxruntime"] == _ort_accuracy(out / ONNX_FILE, images, labels)
    proto = onnx.load(str(out / ONNX_FILE))
    assert selection_crossings(proto) == []
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    readers = [n for n in graph.node if any(x in dequantized for x in n.input)]
    # Only the weight products read int8: the rotary Mul/Add on q and k, the attention products,
    # softmax and the selection all stay float. Independent count: the model's nn.Linear layers
    # (q, k, v, proj, SwiGLU's two inputs and fc2 per block, the head).
    linears = [m for m in colln.prune(eva, keep=0.7).modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 8 * 7 + 1
    assert {n.op_type for n in readers} <= {"MatMul", "Gemm"}
    weighted = [n for n in readers if producer[n.input[1]].op_type == "DequantizeLinear"]
    assert len(weighted) == len(readers) == len(linears)


@pytest.mark.parametrize(
    "flags",
    [
        ("--tome", "8", "--layers", ",".join(map(str, LAYERS))),
        ("--keep", "0.7", "--merge"),
        ("--keep", "0.7", "--output", "dense"),
    ],
    ids=["tome", "merge", "dense"],
)
def test_merged_and_dense_exports_validate(flags, tmp_path, eva, val) -> None:
    out = tmp_path / "export"
    report = _export(out, *flags)
    v = report["validation"]
    _judged(v)
    images, labels = val
    if "dense" in flags:
        session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
        dense = session.run(None, {session.get_inputs()[0].name: images[:4]})[0]
        with torch.no_grad():
            want = colln.prune(eva, keep=0.7, output="dense")(torch.from_numpy(images[:4])).numpy()
        # Every patch of the 8x8 grid, pruned ones included, in patch order.
        assert dense.shape == (4, 64, 64) and v["output"] == "dense"
        np.testing.assert_allclose(dense, want, atol=1e-4, rtol=1e-4)
    else:
        assert v["accuracy"]["onnxruntime"] == _ort_accuracy(out / ONNX_FILE, images, labels)
        assert all(layer["min_merge_margin"] is not None for layer in v["layers"])


def test_tensorrt_parses_and_builds_the_rope_graph(fp32_export, tmp_path) -> None:
    from colln.export.tensorrt import ENGINE_FILE, ENGINE_META_FILE, build_engine, polygraphy_trt, trt_module

    trt = trt_module().module
    built = Path(shutil.copytree(fp32_export, tmp_path / "built", ignore=shutil.ignore_patterns(".*", "openvino")))
    spec = ExportSpec.read(built)
    with polygraphy_trt():
        from polygraphy.backend.trt import NetworkFromOnnxPath

        _, network, _ = NetworkFromOnnxPath(str(built / ONNX_FILE), strongly_typed=True)()
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    widths = [layer.get_output(1).shape[-1] for layer in layers if layer.type == trt.LayerType.TOPK]
    assert widths == list(spec.keep_plan().keep_counts)
    build_engine(built, 1, 2, 4, timing_cache=tmp_path / "timing.cache")
    meta = json.loads((built / ENGINE_META_FILE).read_text())
    assert (built / ENGINE_FILE).is_file() and meta["keep_plan"] == spec.plan_record
    assert meta["io"] == {"images": "float32", "logits": "float32"}


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
def test_onnx_runtime_attention_fusion_on_eva_is_exact_or_absent(rope, tmp_path) -> None:
    """Rotated q/k are not the packed projection's heads: left as they are. Without RoPE, EVA's
    fused q/k/v with its q/v biases fuses, with the outputs of the PyTorch model."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    model = Eva(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5, qkv_bias=True, use_rot_pos_emb=rope)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    reduced = colln.prune(model.eval(), keep=1.0)
    with explicit_attention(reduced):
        proto = export_onnx(reduced, tmp_path / "eva.onnx", input_size=(3, 32, 32))
    fused, count = for_onnxruntime(proto)
    assert count == (0 if rope else 2)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"images": x})[0], want, atol=1e-4, rtol=1e-4)


def test_colln_eval_accuracy_is_the_pruned_models(tmp_path, eva) -> None:
    out = tmp_path / "eval"
    argv = [NAME, "--keep", "0.7", "--metric", "colln", "--method", "prune,merge", "--limit", "48"]
    assert eval_main([*argv, "--rounds", "1", "--warmup", "0", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    test = bundled.load_split("test")
    chosen = np.linspace(0, len(test.labels) - 1, 48).round().astype(int)
    x = preprocess([test.images[i] for i in chosen], eva)
    labels = test.labels[chosen]
    assert result["num_images"] == 48 and len(result["rows"]) == 2
    with torch.no_grad():
        for row in result["rows"]:
            assert tuple(row["layers"]) == LAYERS
            pruned = colln.prune(eva, keep=0.7, layers=LAYERS, merge=row["method"] == "merge")
            assert row["accuracy"] == pytest.approx(float((pruned(x).argmax(-1).numpy() == labels).mean())), row


def test_colln_finetune_writes_weights_that_export_validates(tmp_path, eva, val) -> None:
    out = tmp_path / "ft"
    assert finetune_main([NAME, "--keep", "0.7", "--epochs", "1", "--limit", "32", "--batch-size", "32", "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out / ckpt.WEIGHTS), "pt") as f:
        # The unpruned Eva's own keys (no wrapper prefix), so load_model takes them.
        assert set(f.keys()) == set(eva.state_dict())
    record = json.loads((out / ckpt.RECORD).read_text())
    assert record["plan"]["layers"] == list(LAYERS)
    tuned = colln.prune(load_model(NAME, weights=str(out / ckpt.WEIGHTS)), keep=0.7, layers=LAYERS).eval()
    test = bundled.load_split("test")
    with torch.no_grad():
        predicted = tuned(preprocess(test.images, tuned)).argmax(-1).numpy()
    assert record["accuracy"]["after"] == pytest.approx(float((predicted == test.labels).mean()))
    report = _export(tmp_path / "export", "--keep", "0.7", "--weights", str(out / ckpt.WEIGHTS))
    _judged(report["validation"])
    images, labels = val
    with torch.no_grad():
        assert report["validation"]["accuracy"]["torch"] == float(
            (tuned(torch.from_numpy(images)).argmax(-1).numpy() == labels).mean()
        )


def test_colln_viz_draws_the_tokens_col_ln_keeps(tmp_path, eva) -> None:
    image = tmp_path / "digit.png"
    bundled.load_split("test").images[0].save(image)
    out = tmp_path / "kept.png"
    assert viz_main([NAME, "--image", str(image), "--keep", "0.5", "--metric", "colln", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What colln-viz draws after block 0 (the early schedule's first block) against Col-Ln written out.
    x = preprocess([bundled.load_split("test").images[0]], eva)
    kept = view(eva, x, colln.PruneConfig(keep=0.5, layers=(0, 2, 4))).kept
    with torch.no_grad():
        tokens, rope = eva._pos_embed(eva.patch_embed(x))
        blk, p = eva.blocks[0], eva.num_prefix_tokens
        score = (_probs(blk.attn, blk.norm1(eva.norm_pre(tokens)), rope).mean(1)[0, :, p:] ** 4).sum(0) ** 0.25
    top = score.topk(33).values
    assert (top[-2] - top[-1]) / top[0] > 1e-4, "a near-tie: the reference cannot decide the kept set"
    assert kept[0][0] == 0 and set(kept[0][1].tolist()) == set(score.topk(32).indices.tolist())


def test_viz_maps_naflexvit_selections_to_its_patches() -> None:
    """NaFlexVit has no ``patch_embed``: the patches come from the plan."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("naflexvit_base_patch16_gap", img_size=32, embed_dim=32, depth=4, num_heads=2, num_classes=3)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    seen = view(model.eval(), torch.randn(1, 3, 32, 32), colln.PruneConfig(keep=0.5, layers=(0, 2)))
    assert [(layer, len(kept)) for layer, kept in seen.kept] == [(0, 2), (2, 1)]


def test_colln_viz_runs_on_naflexvit(tmp_path) -> None:
    image, out = tmp_path / "digit.png", tmp_path / "kept.png"
    bundled.load_split("test").images[0].save(image)
    argv = ["naflexvit_base_patch16_gap", "--weights", "random", "--image", str(image), "--metric", "colln", "--out", str(out)]
    assert viz_main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_pruned_eva_reads_a_labelled_folder_like_its_model(tmp_path, eva) -> None:
    """The wrapped (pruned) Eva exposes its head's size, so a class-folder dataset maps to it as to
    the unpruned model (it raised AttributeError: colln-finetune digits_eva --data DIR, exit 3)."""
    from colln.train.datasets import open_dataset

    split = bundled.load_split("test")
    for label in range(10):
        (tmp_path / str(label)).mkdir()
        split.images[int(np.flatnonzero(split.labels == label)[0])].save(tmp_path / str(label) / "a.png")
    pruned = colln.prune(eva, keep=0.7, layers=LAYERS)
    assert pruned.num_classes == eva.num_classes == 10
    got, want = open_dataset(tmp_path, pruned, training=False), open_dataset(tmp_path, eva, training=False)
    assert [int(got[i][1]) for i in range(10)] == [int(want[i][1]) for i in range(10)] == list(range(10))
