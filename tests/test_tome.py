"""ToMe (``colln.tome``, ``colln-export --tome``): the bipartite merge and the whole merged model
against plain per-image references written from the paper (tests/merge_reference.py), r=0
identity, clamped plans, the exported graph (ONNX Runtime validation, no Scatter, TensorRT-RTX
parse and build) and the bad inputs. digits_vit with its bundled trained weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from merge_reference import clear_images, digits_variant, export_error, graph_ops, plain_forward, plain_tome, tensorrt_builds

import colln
from colln.app.export_cli import main as export_main
from colln.models import ops
from colln.models.plan import KeepPlan


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 3])
@pytest.mark.parametrize("r", [1, 5, 13])
def test_bipartite_merge_matches_the_plain_loop(r: int, num_prefix: int) -> None:
    """num_prefix 0: unmerged A tokens in similarity order; 1 ([CLS]): the official layout; 2, 3
    (distillation or register tokens): colln's rule, every prefix token protected and in front."""
    torch.manual_seed(r)
    n = 26 + num_prefix
    r = min(r, (n - num_prefix) // 2)
    x, mean_keys = torch.randn(3, n, 8), torch.randn(3, n, 5)
    sizes = torch.randint(1, 4, (3, n)).float()
    tokens, out_sizes, merged, order = ops.bipartite_merge(x, mean_keys, sizes, r, num_prefix=num_prefix)
    assert tokens.shape == (3, n - r, 8) and merged.shape == (3, r) and order.shape == (3, n - r - num_prefix)
    for b in range(3):
        want, want_sizes, want_order = plain_tome(x[b], mean_keys[b], sizes[b], r, num_prefix)
        torch.testing.assert_close(tokens[b], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_sizes[b], want_sizes)
        assert order[b].tolist() == want_order
    # Sizes are conserved: every patch is still counted once.
    torch.testing.assert_close(out_sizes.sum(-1), sizes.sum(-1))


def test_bipartite_merge_alternates_the_sets_over_the_whole_sequence() -> None:
    """The official partition by hand: [CLS] c0 c1 c2 c3 splits into A = [CLS], c1, c3 and B = c0, c2
    (the first patch in B). c3 equals c0, so r = 1 merges c3 into c0: [CLS], c1, (c0 + c3) / 2, c2."""
    mean_keys = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 1, 0]]])
    x = torch.arange(5.0).reshape(1, 5, 1)
    tokens, sizes, merged, order = ops.bipartite_merge(x, mean_keys, torch.ones(1, 5), 1, num_prefix=1)
    assert tokens.flatten().tolist() == [0.0, 2.0, 2.5, 3.0] and sizes.tolist() == [[1.0, 1.0, 2.0, 1.0]]
    # merged indexes the A candidates (c1, c3); order the candidates each output continues.
    assert merged.tolist() == [[1]] and order.tolist() == [[1, 0, 2]]


@pytest.mark.parametrize("prop_attn", [True, False])
def test_tome_model_matches_a_plain_per_image_forward(trained_digits_vit, digits_test_images, prop_attn: bool) -> None:
    _check_against_plain_forward(trained_digits_vit, digits_test_images, prop_attn=prop_attn)


@pytest.mark.parametrize(("class_token", "reg_tokens"), [(False, 0), (True, 2)])
def test_tome_model_without_prefix_or_with_registers_matches_the_plain_forward(
    trained_digits_vit, digits_test_images, class_token: bool, reg_tokens: int
) -> None:
    """No prefix (unmerged A tokens in similarity order) and [CLS] + 2 registers (all protected, in front)."""
    model = digits_variant(trained_digits_vit, class_token=class_token, reg_tokens=reg_tokens)
    assert model.num_prefix_tokens == int(class_token) + reg_tokens
    _check_against_plain_forward(model, digits_test_images[:12], prop_attn=True)


def _check_against_plain_forward(model, images, prop_attn: bool) -> None:
    merged = colln.tome(model, 8, prop_attn=prop_attn)
    plan = colln.get_plan(merged)
    with torch.no_grad(), colln.record_selections(merged) as selections:
        logits = merged(images)
    clear = clear_images(selections, len(images))
    assert clear.sum() >= len(images) // 3
    r = dict(zip(plan.layers, plan.merge_counts))
    for b in np.flatnonzero(clear):
        want = plain_forward(model, images[b], tome=r, prop_attn=prop_attn)
        torch.testing.assert_close(logits[b], want, atol=2e-4, rtol=1e-4)


def test_r_zero_is_exactly_the_unpruned_model(trained_digits_vit, digits_test_images) -> None:
    with torch.no_grad():
        assert torch.equal(colln.tome(trained_digits_vit, 0)(digits_test_images), trained_digits_vit(digits_test_images))
        assert torch.equal(
            colln.tome(trained_digits_vit, [0] * 8, prop_attn=False)(digits_test_images), trained_digits_vit(digits_test_images)
        )


def test_plan_clamps_r_to_half_the_candidates_and_round_trips(trained_digits_vit) -> None:
    plan = colln.get_plan(colln.tome(trained_digits_vit, 40))
    assert plan.merge_counts == (32, 16, 8, 4, 2, 1, 0, 0)
    assert plan.tokens_in == (65, 33, 17, 9, 5, 3, 2, 2) and plan.tokens_out == 2
    assert "block 0: r=32 (clamped from 40)" in str(plan)
    assert KeepPlan.from_dict(json.loads(plan.to_json())).to_dict() == plan.to_dict()
    per_block = colln.get_plan(colln.tome(trained_digits_vit, [4, 0, 8], layers=[1, 3, 5]))
    assert per_block.merge_counts == (4, 0, 8) and per_block.merge_layers == ((1, 4), (5, 8))
    assert per_block.tokens_in == (65, 65, 61, 61, 61, 61, 53, 53)
    # FLOPs follow the token counts: fewer tokens, smaller estimate.
    assert per_block.flops().pruned > plan.flops().pruned


@pytest.fixture(scope="module")
def tome_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tome") / "tome8"
    assert export_main(["digits_vit", "--tome", "8", "--out", str(out), "--no-latency", "--val-limit", "96"]) == 0
    return out


def test_export_validates_in_onnxruntime_and_reports_the_plan(tome_export: Path) -> None:
    report = json.loads((tome_export / "report.json").read_text())
    assert report["validation"]["passed"] and report["validation"]["judged_images"] > 48
    assert report["plan"]["tome"] == 8 and report["plan"]["merge_counts"] == [8, 8, 8, 8, 8, 8, 8, 4]
    assert [layer["k"] for layer in report["validation"]["layers"]] == [8, 8, 8, 8, 8, 8, 8, 4]
    assert all(layer["min_merge_margin"] is not None for layer in report["validation"]["layers"])


def test_graph_has_no_scatter_and_constant_topk(tome_export: Path) -> None:
    ops_used = graph_ops(tome_export)
    # Per merging block a TopK ranking the edges and one putting the unmerged A tokens back in
    # order (none when every A token merges: blocks 6 and 7 here); every K a constant.
    report = json.loads((tome_export / "report.json").read_text())
    assert ops_used["TopK"] == 14 == len(report["export"]["topk_k"])
    assert report["export"]["topk_k"][:4] == [32, 24, 28, 20]


def test_tensorrt_parses_and_builds_the_tome_graph(tome_export: Path, tmp_path: Path) -> None:
    assert tensorrt_builds(tome_export, tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tome", "-1"], "arguments: --tome must be integers >= 0"),
        (["--tome", "1.5"], "arguments: --tome must be comma-separated integers"),
        (["--tome", "8,8"], "plan: 2 ToMe r values for 8 merging blocks"),
        (["--tome", "8", "--keep", "0.5"], "arguments: --tome replaces --keep"),
        (["--tome", "8", "--merge"], "plan: --tome cannot be combined with --merge"),
        (["--tome", "8", "--layers", "9"], "plan: layer 9 is out of range"),
        (["--tome", "8", "--precision", "fp16"], "arguments: --tome needs --precision fp32"),
    ],
)
def test_bad_tome_inputs_exit_2_in_one_line(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert export_error(args, tmp_path, capsys).startswith(f"colln: error: {message}")


@pytest.mark.parametrize("method", ["tome", "merge"])
def test_finetune_trains_merged_models_and_records_their_plan(trained_digits_vit, method: str, tmp_path: Path) -> None:
    from torch.utils.data import Subset

    from colln.errors import PlanMismatchError
    from colln.train import checkpoint as ckpt
    from colln.train.datasets import DigitsDataset

    merged = colln.tome(trained_digits_vit, 12) if method == "tome" else colln.prune(trained_digits_vit, keep=0.5, merge=True)
    train = Subset(DigitsDataset("train", trained_digits_vit, augment=False), range(64))
    result = colln.finetune(merged, train, teacher=trained_digits_vit, epochs=1, batch_size=32, lr=1e-3)
    tuned, before = result.model.state_dict(), merged.state_dict()
    assert not all(torch.equal(tuned[k], before[k]) for k in tuned)
    assert colln.get_plan(result.model).to_dict() == colln.get_plan(merged).to_dict()
    ckpt.save_weights(result.model, tmp_path / ckpt.WEIGHTS)
    ckpt.write_record(tmp_path / ckpt.RECORD, {"plan": colln.get_plan(result.model).to_dict()})
    weights = tmp_path / ckpt.WEIGHTS
    same = colln.PruneConfig(keep=1.0, tome=12) if method == "tome" else colln.PruneConfig(keep=0.5, merge=True)
    assert ckpt.check_recorded_plan(weights, same, force=False) is None
    other = colln.PruneConfig(keep=1.0, tome=8) if method == "tome" else colln.PruneConfig(keep=0.5)
    flags = (
        "--tome 12 --layers 0,1,2,3,4,5,6,7" if method == "tome" else "--keep 0.5 --layers 2,4,6 --metric colln --norm 4 --merge"
    )
    with pytest.raises(PlanMismatchError, match=f"fine-tuned for {flags}, this export asks"):
        ckpt.check_recorded_plan(weights, other, force=False)


def test_a_merging_block_refuses_to_run_without_the_sizes(trained_digits_vit) -> None:
    """timm's gradient checkpointing calls blocks one by one: the sizes would be lost, so it is refused."""
    from colln.errors import UnsupportedModelError

    merged = colln.tome(trained_digits_vit, 8)
    with pytest.raises(UnsupportedModelError, match="leave timm's gradient checkpointing off"):
        merged.blocks[3](torch.randn(1, 41, 64))
