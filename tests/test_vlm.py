"""Vision-language towers: ``output="tokens"`` returns the feature layer's kept patch tokens and their
patch ids. Checked against timm's own ``forward_intermediates`` and plainly written Col-Ln / merge
references, then through every command (export, validate, bench, Triton, TensorRT) on the bundled
digits_vit, and the bad inputs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from google.protobuf import text_format
from speed_checks import assert_plausible_speedup
from tritonclient.grpc import model_config_pb2

import colln
from colln.app.bench_cli import main as bench_main
from colln.app.export_cli import main as export_main
from colln.app.validate_cli import main as validate_main
from colln.data import validation_images
from colln.errors import PlanError
from colln.export.spec import ExportSpec, file_sha256
from colln.export.triton import write_model_repository
from colln.infer.runners import TorchRunner
from colln.models import ops
from colln.models.registry import load_model
from colln.verify.validate import validate
from serving_helpers import HOST, digit_images, free_ports, launch, stop, wait_ready

LM_PARAMS = 7e9


def tiny_vit(**options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    return timm.models.vision_transformer.VisionTransformer(**{**args, **options}).eval()


def block_input(model: torch.nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The tokens entering block ``layer`` (prefix included), through timm's forward_features steps."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks[:layer]:
        h = blk(h)
    return h


def plain_colln_scores(block: torch.nn.Module, x: torch.Tensor, num_prefix: int, norm: int = 4) -> torch.Tensor:
    """Per image and patch: the l_n norm of its column in the head-averaged attention, attention
    written out from the block's weights. ``[B, N - num_prefix]``."""
    attn = block.attn
    rows = []
    for img in block.norm1(x):
        q, kk, _ = (img @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, dim=-1)
        heads = attn.num_heads
        q = q.reshape(len(img), heads, -1).transpose(0, 1)
        kk = kk.reshape(len(img), heads, -1).transpose(0, 1)
        probs = torch.softmax(q @ kk.transpose(1, 2) * attn.head_dim**-0.5, dim=-1).mean(0)
        rows.append((probs[:, num_prefix:] ** norm).sum(0) ** (1 / norm))
    return torch.stack(rows)


def plain_colln_topk(block: torch.nn.Module, x: torch.Tensor, num_prefix: int, k: int) -> list[set[int]]:
    """Per image: the k patch ids with the largest Col-Ln scores."""
    return [set(torch.topk(row, k).indices.tolist()) for row in plain_colln_scores(block, x, num_prefix)]


@pytest.mark.parametrize(
    "name, options",
    [
        ("cls token", {}),
        ("registers, no [CLS], map head (SigLIP-like)", {"class_token": False, "reg_tokens": 2, "global_pool": "map"}),
        ("pre-norm (CLIP-like)", {"pre_norm": True}),
    ],
)
@pytest.mark.parametrize("feature_layer", [-2, 1])
def test_tokens_are_timm_features_at_the_colln_picks(name: str, options: dict, feature_layer: int) -> None:
    model = tiny_vit(**options)
    x = torch.randn(3, 3, 32, 32)
    encoder = colln.prune(model, 0.3, output="tokens", feature_layer=feature_layer)
    with torch.no_grad():
        tokens, indices = encoder(x)
        block = feature_layer % len(model.blocks)
        features = model.forward_intermediates(x, indices=[feature_layer], output_fmt="NLC", intermediates_only=True)[0]
        expected_picks = plain_colln_topk(model.blocks[block], block_input(model, x, block), model.num_prefix_tokens, 20)
    k = math.ceil(0.3 * 64)
    assert tokens.shape == (3, k, 32) and tokens.dtype == torch.float32
    assert indices.shape == (3, k) and indices.dtype == torch.int64
    assert (indices.diff(dim=1) > 0).all(), "spatial order: increasing patch ids"
    assert [set(row.tolist()) for row in indices] == expected_picks
    torch.testing.assert_close(tokens, features.gather(1, indices.unsqueeze(-1).expand(-1, -1, 32)), atol=1e-5, rtol=1e-5)
    assert len(encoder.vit.blocks) == block + 1, "blocks after the feature layer are not kept"


def test_patch_ids_follow_inner_pruning_in_score_order() -> None:
    """With an inner pruning block (score order), the returned ids are original patch ids: each
    token equals the logits-pruned model's features at that patch after the same blocks."""
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    encoder = colln.prune(model, (0.5, 0.25), layers=(1,), output="tokens", feature_layer=2, order="score")
    inner = colln.prune(model, 0.5, layers=(1,))
    with torch.no_grad(), colln.record_selections(inner) as selections:
        tokens, ids = encoder(x)
        h = inner.norm_pre(inner._pos_embed(inner.patch_embed(x)))
        for blk in inner.blocks[:3]:
            h = blk(h)
    survivors = selections[0].indices  # candidates of block 1 are the patches themselves
    assert ids.shape == (2, 16) and set(ids.flatten().tolist()) <= set(range(64))
    for b in range(2):
        rows = {int(p): h[b, 1 + j] for j, p in enumerate(survivors[b])}
        for token, patch in zip(tokens[b], ids[b].tolist()):
            torch.testing.assert_close(token, rows[patch], atol=1e-5, rtol=1e-5)


def plain_merge(x: torch.Tensor, keys: torch.Tensor, kept: list[int], scores: torch.Tensor) -> torch.Tensor:
    """One image: each pruned token joins the kept token with the most similar key (cosine); each
    kept token becomes the score-weighted mean of itself and its joiners."""
    total = {i: scores[i] * x[i] for i in kept}
    weight = {i: scores[i].clone() for i in kept}
    for j in range(len(x)):
        if j in kept:
            continue
        sims = [torch.cosine_similarity(keys[j], keys[i], dim=0) for i in kept]
        owner = kept[int(torch.stack(sims).argmax())]
        total[owner] = total[owner] + scores[j] * x[j]
        weight[owner] = weight[owner] + scores[j]
    return torch.stack([total[i] / weight[i] for i in kept])


def test_merge_tokens_matches_a_plain_loop() -> None:
    torch.manual_seed(1)
    x, keys, scores = torch.randn(2, 12, 5), torch.randn(2, 12, 3), torch.rand(2, 12) + 0.1
    indices = torch.tensor([[3, 0, 7], [11, 5, 2]])
    merged = ops.merge_tokens(x, keys, indices, scores)[0]
    for b in range(2):
        torch.testing.assert_close(merged[b], plain_merge(x[b], keys[b], indices[b].tolist(), scores[b]), atol=1e-5, rtol=1e-5)


def test_merge_uses_the_feature_block_keys_and_runs_in_onnxruntime(tmp_path: Path) -> None:
    """--merge keeps the same patches as without, and merges the feature block's output rows by
    its own keys and Col-Ln scores (both written out from its qkv weights); ONNX Runtime agrees."""
    from colln.export.artifact import export_into

    model = load_model("digits_vit")
    x = torch.from_numpy(digit_images(4))
    exported = export_into(ExportSpec("digits_vit", pruning=colln.PruneConfig(keep=0.25, output="tokens", merge=True)), tmp_path)
    with torch.no_grad():
        tokens, ids = exported.pruned(x)
        _, plain_ids = colln.prune(model, 0.25, output="tokens")(x)
        block, entering = model.blocks[6], block_input(model, x, 6)
        h = block.norm1(entering)
        dim = h.shape[-1]
        keys = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias)[..., dim : 2 * dim]
        features = model.forward_intermediates(x, indices=[6], output_fmt="NLC", intermediates_only=True)[0]
        scores = plain_colln_scores(block, entering, 1)
    torch.testing.assert_close(ids, plain_ids, rtol=0, atol=0)
    for b in range(4):
        expected = plain_merge(features[b], keys[b, 1:], ids[b].tolist(), scores[b])
        torch.testing.assert_close(tokens[b], expected, atol=1e-4, rtol=1e-4)
    ort_tokens, ort_ids = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"images": x.numpy()})
    np.testing.assert_array_equal(ort_ids, ids.numpy())
    np.testing.assert_allclose(ort_tokens, tokens.numpy(), atol=1e-4)


def test_plan_counts_flops_and_lm_savings() -> None:
    plan = colln.plan_for(tiny_vit(), (0.5, 0.25), layers=(1,), output="tokens")
    assert (plan.feature_block, plan.final_k, plan.keep_counts, plan.blocks_run) == (2, 16, (32,), 3)
    assert plan.token_steps == "65 -> 33 -> 16"
    assert plan.lm_prefill_flops_saved(LM_PARAMS) == 2 * LM_PARAMS * (64 - 16)
    # The unpruned counterpart is the encoder cut at the same block: 3 blocks of 65 tokens, no head.
    assert plan.flops().full == colln.plan_for(tiny_vit(), 1.0, output="tokens").flops().pruned
    assert colln.KeepPlan.from_dict(json.loads(plan.to_json())) == plan


@pytest.fixture(scope="module")
def tokens_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``colln-export digits_vit --output tokens --keep 0.7,0.5 --layers 2`` (validated, timed)."""
    out = tmp_path_factory.mktemp("vlm") / "digits_tokens"
    argv = ["digits_vit", "--output", "tokens", "--keep", "0.7,0.5", "--layers", "2", "--out", str(out)]
    assert export_main([*argv, "--latency-batches", "1", "--latency-rounds", "3"]) == 0
    return out


def test_export_report_and_onnx_outputs(tokens_export: Path) -> None:
    report = json.loads((tokens_export / "report.json").read_text())
    assert report["tokens"] == {
        "feature_block": 6,
        "num_patches": 64,
        "k": 32,
        "reduction": "64 -> 32",
        "lm_params": LM_PARAMS,
        "lm_prefill_flops_saved": 2 * LM_PARAMS * 32,
    }
    assert report["export"]["spec"]["pruning"]["output"] == "tokens"
    v = report["validation"]
    # ORT vs PyTorch on the 450 digits of the test split: identical kept sets, tokens within 1e-4.
    assert v["passed"] and v["output"] == "tokens" and v["images"] == 450 and v["judged_images"] == 450
    assert [(layer["layer"], layer["k"], layer["identical_fraction"]) for layer in v["layers"]] == [(2, 45, 1.0), (6, 32, 1.0)]
    assert v["max_abs_error"] <= 1e-4 and v["min_cosine"] >= 0.9999
    assert_plausible_speedup(report["latency"]["batches"]["1"], report["latency"]["flops_bound"])
    session = ort.InferenceSession(str(tokens_export / "model.onnx"))
    outputs = [(o.name, o.type, o.shape) for o in session.get_outputs()]
    assert outputs == [("tokens", "tensor(float)", ["batch", 32, 64]), ("indices", "tensor(int64)", ["batch", 32])]
    images = digit_images(5)
    tokens, ids = session.run(None, {"images": images})
    ref_tokens, ref_ids = ExportSpec.read(tokens_export).load_pruned()(torch.from_numpy(images))
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(tokens, ref_tokens.detach().numpy(), atol=1e-4)


def test_validation_catches_a_different_selection() -> None:
    """The tie rule on token outputs: the reference itself passes; a candidate that picks by [CLS]
    attention instead of Col-Ln keeps other patches, far outside the tie band, and fails."""
    unpruned = load_model("digits_vit")
    reference = colln.prune(unpruned, 0.5, output="tokens")
    images = validation_images("digits_vit", unpruned, None, 32)
    same = validate(reference, unpruned, TorchRunner(colln.prune(unpruned, 0.5, output="tokens"), name="same"), images)
    assert same.passed and same.judged_images == 32 and same.max_abs_error == 0.0
    other = TorchRunner(colln.prune(unpruned, 0.5, output="tokens", metric="cls"), name="cls")
    failed = validate(reference, unpruned, other, images)
    assert not failed.passed
    assert "layer 6" in failed.mismatches[0] and "outside PyTorch's tie band" in failed.mismatches[0]


def test_tokens_report_fields_mean_what_the_logits_fields_mean() -> None:
    """max_abs_error / min_cosine are over all images, as for logits; *_judged over the judged ones
    (the verdict's). Checked by plain numpy on the two models' outputs, rows matched by patch id."""
    unpruned = load_model("digits_vit")
    reference = colln.prune(unpruned, 0.5, output="tokens")
    other = colln.prune(unpruned, 0.5, output="tokens", metric="cls")
    images = validation_images("digits_vit", unpruned, None, 32)
    report = validate(reference, unpruned, TorchRunner(other, name="cls"), images)
    with torch.no_grad():
        (ref_tok, ref_ids), (cand_tok, cand_ids) = (m.eval()(torch.from_numpy(images.images)) for m in (reference, other))
    ref_tok = np.take_along_axis(ref_tok.numpy(), np.argsort(ref_ids.numpy(), axis=1)[..., None], axis=1)
    cand_tok = np.take_along_axis(cand_tok.numpy(), np.argsort(cand_ids.numpy(), axis=1)[..., None], axis=1)
    err = np.abs(cand_tok - ref_tok)
    dot = (cand_tok.astype(np.float64) * ref_tok).sum(-1)
    cos = dot / (np.linalg.norm(cand_tok.astype(np.float64), axis=-1) * np.linalg.norm(ref_tok.astype(np.float64), axis=-1))
    assert report.judged_images < report.images == 32
    assert report.max_abs_error == pytest.approx(float(err.max()), rel=1e-5)
    assert report.mean_abs_error == pytest.approx(float(err.mean()), rel=1e-5)
    assert report.min_cosine == pytest.approx(float(cos.min(axis=1).min()), rel=1e-6)
    assert report.mean_cosine == pytest.approx(float(cos.min(axis=1).mean()), rel=1e-6)
    if report.judged_images:
        assert report.max_abs_error_judged <= report.max_abs_error
    else:
        assert report.max_abs_error_judged is None and report.min_cosine_judged is None


@pytest.mark.parametrize("cand_ids, explained", [([0, 2], True), ([0, 3], False)])
def test_final_selection_tie_rule_on_patch_ids(cand_ids: list[int], explained: bool) -> None:
    """The candidate's ``indices`` output (patch ids) goes through the same tie rule: swapping a
    kept patch for one tied with PyTorch's k-th score is explained (the image is just not judged);
    swapping it for a clearly lower one is a mismatch."""
    from colln.verify.validate import TOLERANCES, Observed, Reference, _judge_selections

    scores = np.array([[0.5, 0.3, 0.3, 0.1]], dtype=np.float32)
    ref = Reference(outputs=np.zeros((1, 2, 1)), unpruned=None, kept={6: np.array([[0, 1]])}, scores={6: scores})
    seen = Observed(np.zeros((1, 2, 1)), kept={}, patch_ids={6: np.array([cand_ids])})
    judged = _judge_selections(ref, seen, [(6, 2)], "colln", False, TOLERANCES["fp32"], "onnxruntime")
    checks, mismatches = judged.layers, judged.findings.mismatches
    assert not judged.judged[0] and checks[0].diverged_here == 1
    assert (checks[0].explained, not mismatches) == (int(explained), explained)


def test_validate_and_bench_commands(tokens_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "validation.json"
    assert validate_main([str(tokens_export), "--val-limit", "64", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["passed"]
    bench = tmp_path / "bench.json"
    assert bench_main([str(tokens_export), "--batch", "1", "--rounds", "3", "--json", str(bench)]) == 0
    report = json.loads(bench.read_text())
    base = ExportSpec.read(Path(report["unpruned_export"]))
    # The baseline: the same encoder cut at the same block, every patch token out.
    assert (base.pruning.output, base.keep_plan().final_k, base.keep_plan().feature_block) == ("tokens", 64, 6)
    assert report["batches"]["1"]["bound"] == pytest.approx(report["flops"]["bound"])


def test_triton_repository_has_both_outputs(tokens_export: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(tokens_export, tmp_path / "repo")
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("tokens", model_config_pb2.TYPE_FP32, [32, 64]),
        ("indices", model_config_pb2.TYPE_INT64, [32]),
    ]


def test_serve_returns_tokens_and_indices(tokens_export: Path, tmp_path: Path) -> None:
    import tritonclient.http as httpclient

    http, grpc, metrics = free_ports(3)
    argv = [str(Path(sys.executable).with_name("colln-serve")), str(tokens_export), "--http-port", str(http)]
    proc = launch([*argv, "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-batch", "4"], tmp_path / "serve.log")
    try:
        wait_ready(proc, f"{HOST}:{http}")
        client = httpclient.InferenceServerClient(f"{HOST}:{http}")
        images = digit_images(3)
        tensor = httpclient.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        result = client.infer(tokens_export.name, [tensor])
        tokens, ids = ort.InferenceSession(str(tokens_export / "model.onnx")).run(None, {"images": images})
        assert result.as_numpy("indices").dtype == np.int64
        np.testing.assert_array_equal(result.as_numpy("indices"), ids)
        np.testing.assert_allclose(result.as_numpy("tokens"), tokens, atol=1e-5)
    finally:
        assert stop(proc) == 0


def test_tensorrt_parses_and_builds_the_tokens_graph(tokens_export: Path, tmp_path: Path) -> None:
    pytest.importorskip("polygraphy")
    from colln.export.tensorrt import ENGINE_FILE, ENGINE_META_FILE, build_engine, polygraphy_trt, trt_module

    try:
        flavour = trt_module()
    except colln.CollnError:
        pytest.skip("no TensorRT installed")
    import shutil

    with polygraphy_trt():
        from polygraphy.backend.trt import NetworkFromOnnxPath

        _, network, _ = NetworkFromOnnxPath(str(tokens_export / "model.onnx"), strongly_typed=True)()
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    # Static token counts: K = 32 after the TopKs (inner k = 45, final 32, its spatial sort 32).
    assert [(t.name, tuple(t.shape)) for t in outputs] == [("tokens", (-1, 32, 64)), ("indices", (-1, 32))]
    topk = [
        network.get_layer(i).get_output(1).shape[-1]
        for i in range(network.num_layers)
        if network.get_layer(i).type == flavour.module.LayerType.TOPK
    ]
    assert topk == [45, 32, 32]
    built = tmp_path / "built"
    shutil.copytree(tokens_export, built)
    build_engine(built, 1, 2, 4, timing_cache=tmp_path / "timing.cache")
    meta = json.loads((built / ENGINE_META_FILE).read_text())
    assert (built / ENGINE_FILE).is_file() and meta["tensorrt"]["flavour"] == flavour.name
    assert meta["onnx_sha256"] == file_sha256(built / "model.onnx")
    assert meta["io"] == {"images": "float32", "tokens": "float32", "indices": "int64"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--feature-layer", "8"], "plan: feature layer 8 is out of range: this model has blocks 0..7"),
        (["--feature-layer", "-9"], "plan: feature layer -9 is out of range"),
        (["--layers", "6", "--keep", "0.7,0.5"], "plan: pruning layer 6 is at or after the feature layer (block 6)"),
        (["--keep", "0"], "plan: keep rate 0.0 is outside (0, 1]"),
        (["--layers", "2", "--keep", "0.5,0.9"], "plan: the final selection keeps 58 of 64 patches but only 32 survive"),
        (["--fuse"], "plan: --fuse does not apply to output 'tokens'"),
        (["--keep", "0.7,0.5"], "plan: 2 keep rates for 0 inner pruning layers and the final selection"),
        (["--merge", "--precision", "fp16"], "arguments: --merge needs --precision fp32: in fp16,"),
        (["--merge", "--precision", "int8"], "arguments: --merge needs --precision fp32: in int8,"),
    ],
)
def test_bad_tokens_inputs_exit_2_in_one_line(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert export_main(["digits_vit", "--output", "tokens", *args, "--out", str(tmp_path / "x")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("colln: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"colln: error: {message}"), errors
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("option", [["--order", "score"], ["--feature-layer", "-2"]])
def test_token_options_need_output_tokens(option: list[str], tmp_path: Path, capsys) -> None:
    assert export_main(["digits_vit", *option, "--out", str(tmp_path / "x")]) == 2
    assert "applies to output 'tokens' only" in capsys.readouterr().err


def test_api_refuses_bad_settings() -> None:
    with pytest.raises(PlanError, match="unknown output"):
        colln.PruneConfig(output="features")
    with pytest.raises(PlanError, match="unknown order"):
        colln.PruneConfig(output="tokens", order="random")
