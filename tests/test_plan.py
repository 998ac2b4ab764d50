"""Keep plans: the paper's token counts, refusals, JSON, and the FLOPs estimate vs a FLOP counter."""

import copy
import json
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import Attention
from torch.utils.flop_counter import FlopCounterMode

import colln
from colln.errors import PlanError
from colln.models.config import PruneConfig
from colln.models.plan import BlockOp, KeepPlan, ModelDims, default_layers, make_plan

VIT_B = ModelDims(depth=12, attn_dim=768, attn_linear_macs=4 * 768 * 768, mlp_macs=2 * 768 * 3072, patch_macs=0, head_macs=0)


def test_paper_counts_without_fusion() -> None:
    plan = make_plan(197, 1, VIT_B, PruneConfig(keep=0.7, layers=(3, 6, 9)))
    assert plan.keep_counts == (138, 97, 68)
    assert [plan.tokens_after(i) for i in (3, 6, 9)] == [139, 98, 69]
    assert plan.tokens_in[:4] == (197, 197, 197, 197)
    assert plan.tokens_in[4] == 139 and plan.tokens_out == 69


def test_paper_counts_with_fusion() -> None:
    plan = make_plan(197, 1, VIT_B, PruneConfig(keep=0.7, layers=(3, 6, 9), fuse=True))
    assert [plan.tokens_after(i) for i in (3, 6, 9)] == [140, 100, 72]


def test_keep_count_formula_per_layer_rates() -> None:
    plan = make_plan(197, 1, VIT_B, PruneConfig(keep=(0.9, 0.5, 0.3), layers=(0, 3, 6)))
    n = 196
    expected = []
    for rate in (0.9, 0.5, 0.3):
        n = math.ceil(rate * n - 1e-9)
        expected.append(n)
    assert list(plan.keep_counts) == expected


def test_float_noise_does_not_round_up() -> None:
    # 0.7 * 130 is 91.00000000000001 in binary floating point.
    plan = make_plan(131, 1, VIT_B, PruneConfig(keep=0.7, layers=(0,)))
    assert plan.keep_counts == (91,)


def test_round_to_multiple_is_capped_at_candidates() -> None:
    plan = make_plan(197, 1, VIT_B, PruneConfig(keep=0.7, layers=(3, 6, 9), round_to=8))
    assert plan.keep_counts == (144, 104, 80)
    full = make_plan(197, 1, VIT_B, PruneConfig(keep=0.99, layers=(3,), round_to=8))
    assert full.keep_counts == (196,)


def test_default_layers_scale_evit() -> None:
    assert default_layers(12) == (3, 6, 9)
    assert default_layers(8) == (2, 4, 6)
    assert default_layers(24) == (6, 12, 18)


def test_keep_one_is_identity_plan() -> None:
    plan = make_plan(197, 1, VIT_B, PruneConfig(keep=1.0, layers=(3, 6, 9), fuse=True))
    assert plan.tokens_out == 197
    assert plan.flops().bound == 1.0


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"keep": 0.0}, "outside (0, 1]"),
        ({"keep": 1.5}, "outside (0, 1]"),
        ({"keep": -0.1}, "outside (0, 1]"),
        ({"layers": (3, 12)}, "layer 12 is out of range"),
        ({"layers": (6, 3)}, "strictly increasing"),
        ({"layers": (3, 3)}, "strictly increasing"),
        ({"metric": "entropy"}, "unknown metric"),
        ({"keep": (0.5, 0.5), "layers": (1, 2, 3)}, "2 keep rates for 3"),
        ({"norm": 0}, "norm order"),
        ({"rescue": 1.0}, "rescue ratio"),
    ],
)
def test_invalid_plans_raise_one_line(kwargs: dict, needle: str) -> None:
    with pytest.raises(PlanError) as info:
        make_plan(197, 1, VIT_B, PruneConfig(**kwargs))
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_json_round_trip_and_str() -> None:
    plan = make_plan(197, 1, VIT_B, PruneConfig(keep=0.7, layers=(3, 6, 9), metric="correct", fuse=True))
    data = json.loads(plan.to_json())
    assert data["keep_counts"] == [138, 98, 70]
    assert data["flops"]["bound"] == pytest.approx(plan.flops().bound)
    assert KeepPlan.from_dict(data) == plan
    text = str(plan)
    assert "197 -> 140 -> 100 -> 72" in text and "k=138" in text
    with pytest.raises(AttributeError):
        plan.keep_counts = (1,)  # frozen


def _counted_flops(
    model: torch.nn.Module,
    size: int,
) -> int:
    """torch's FLOP counter on a forward through timm's explicit attention (q @ k^T, softmax, @ v):
    whether the counter sees the fused scaled_dot_product_attention call depends on the torch
    version and device (2.14.1 on CPU misses it), the matmuls of the math path it always counts."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops()


def test_flops_estimate_matches_torch_flop_counter() -> None:
    """The plan's estimate vs torch's own FLOP counter on the real pruned and unpruned model, and
    the unpruned count vs the ViT formula written out for vit_tiny_patch16_224."""
    model = timm.create_model("vit_tiny_patch16_224").eval()
    pruned = colln.prune(model, keep=0.7)
    estimate = colln.get_plan(pruned).flops()
    full, cut = _counted_flops(model, 224), _counted_flops(pruned, 224)
    assert estimate.full == pytest.approx(full, rel=0.01)
    assert estimate.pruned == pytest.approx(cut, rel=0.01)
    assert estimate.bound == pytest.approx(full / cut, rel=0.01)
    # Multiply-adds: 196 patches of 16x16x3 -> 192, then 12 blocks on 197 tokens of width 192
    # (qkv + proj, fc1 + fc2 with hidden 768, q @ k^T and attn @ v), then the 192 -> 1000 head.
    tokens, dim, hidden = 197, 192, 768
    block = tokens * (4 * dim * dim + 2 * dim * hidden) + 2 * tokens * tokens * dim
    assert estimate.full == 2 * (196 * 16 * 16 * 3 * dim + 12 * block + dim * 1000)
    # The paper: about 0.65x the FLOPs of the full model for keep 0.7 at 3, 6, 9.
    assert estimate.pruned / estimate.full == pytest.approx(0.65, abs=0.02)


# ViT-B/16 at 224 with its patch embedding and 1000-class head, for FLOPs that count them too.
VIT_B_HEADED = ModelDims(
    depth=12,
    attn_dim=768,
    attn_linear_macs=4 * 768 * 768,
    mlp_macs=2 * 768 * 3072,
    patch_macs=196 * 3 * 16 * 16 * 768,
    head_macs=768 * 1000,
)


def _hand_flops(
    blocks: list[tuple[int, int]],
    head: bool,
) -> int:
    """Multiply-adds x 2 written out: per block, attention on the ``n_in`` tokens entering it
    (qkv + proj, q @ k^T and attn @ v), the MLP on the ``n_mlp`` it keeps; patch embedding, head."""
    d = VIT_B_HEADED
    macs = d.patch_macs + (d.head_macs if head else 0)
    for n_in, n_mlp in blocks:
        macs += n_in * 4 * 768 * 768 + 2 * n_in * n_in * 768 + n_mlp * 2 * 768 * 3072
    return 2 * macs


# (config, tokens entering and MLP tokens of every block run, whether the head runs, and the
# pruned FLOPs the plan gave before its operations drove the count: make_plan(197, 1,
# VIT_B_HEADED, config).flops().pruned at commit 14bd773).
FLOPS_CASES = [
    (
        PruneConfig(keep=0.7, layers=(3, 6, 9)),
        [(197, 197)] * 3 + [(197, 139)] + [(139, 139)] * 2 + [(139, 98)] + [(98, 98)] * 2 + [(98, 69)] + [(69, 69)] * 2,
        True,
        22970502144,
    ),
    (  # merge: the counts of pruning, the dropped tokens merged into the kept
        PruneConfig(keep=0.7, layers=(3, 6, 9), merge=True),
        [(197, 197)] * 3 + [(197, 139)] + [(139, 139)] * 2 + [(139, 98)] + [(98, 98)] * 2 + [(98, 69)] + [(69, 69)] * 2,
        True,
        22970502144,
    ),
    (  # fuse: one more token after each pruning layer (k 138, 98, 70)
        PruneConfig(keep=0.7, layers=(3, 6, 9), fuse=True),
        [(197, 197)] * 3 + [(197, 140)] + [(140, 140)] * 2 + [(140, 100)] + [(100, 100)] * 2 + [(100, 72)] + [(72, 72)] * 2,
        True,
        23219970048,
    ),
    (  # ToMe r=8 at every block: 8 fewer tokens after each
        PruneConfig(keep=1.0, tome=8),
        [(197 - 8 * i, 189 - 8 * i) for i in range(12)],
        True,
        26207846400,
    ),
    (  # ToMe clamped: r 60 at blocks 0, 5, 11 (11 has 76 candidates: r 38), 0 at block 1
        PruneConfig(keep=1.0, tome=(60, 0, 60, 60), layers=(0, 1, 5, 11)),
        [(197, 137)] + [(137, 137)] * 4 + [(137, 77)] + [(77, 77)] * 5 + [(77, 39)],
        True,
        18283831296,
    ),
    (  # tokens: prune 0.7 at block 3, select 98 of 196 at block 10 (the default feature layer -2), no head
        PruneConfig(keep=(0.7, 0.5), layers=(3,), output="tokens"),
        [(197, 197)] * 3 + [(197, 139)] + [(139, 139)] * 6 + [(139, 98)],
        False,
        25117615104,
    ),
    (  # tokens with merge: the feature block's MLP runs on every token (merging needs their features)
        PruneConfig(keep=(0.7, 0.5), layers=(3,), output="tokens", merge=True),
        [(197, 197)] * 3 + [(197, 139)] + [(139, 139)] * 7,
        False,
        25504539648,
    ),
    (  # tokens keeping every patch: no operation at all
        PruneConfig(keep=1.0, output="tokens"),
        [(197, 197)] * 11,
        False,
        32218211328,
    ),
]


@pytest.mark.parametrize("config,blocks,head,recorded", FLOPS_CASES)
def test_flops_follow_the_operations(config: PruneConfig, blocks: list, head: bool, recorded: int) -> None:
    plan = make_plan(197, 1, VIT_B_HEADED, config)
    flops = plan.flops()
    assert flops.pruned == _hand_flops(blocks, head) == recorded
    assert flops.full == _hand_flops([(197, 197)] * len(blocks), head)
    assert plan.tokens_in == tuple(n for n, _ in blocks)


def test_the_views_filter_the_operations() -> None:
    prune = make_plan(197, 1, VIT_B, PruneConfig(keep=(0.7, 1.0, 0.5), layers=(3, 6, 9)))
    assert prune.operations == (BlockOp(3, "prune", 138), BlockOp(9, "prune", 69))  # keep 1.0 at 6: no operation
    assert prune.pruned_layers == prune.kept_index_layers == prune.selection_layers == ((3, 138), (9, 69))
    assert prune.merge_layers == ()
    merge = make_plan(197, 1, VIT_B, PruneConfig(keep=0.7, layers=(3,), merge=True))
    assert merge.operations == (BlockOp(3, "merge", 138),)
    assert merge.merge_layers == merge.kept_index_layers == merge.selection_layers == merge.pruned_layers == ((3, 138),)
    tome = make_plan(197, 1, VIT_B, PruneConfig(keep=1.0, tome=(8, 0, 4), layers=(1, 2, 5)))
    assert tome.operations == (BlockOp(1, "tome", 8), BlockOp(5, "tome", 4))
    assert tome.merge_layers == tome.selection_layers == ((1, 8), (5, 4))
    assert tome.kept_index_layers == () and tome.pruned_layers == ((1, 188), (5, 184))
    tokens = make_plan(197, 1, VIT_B, PruneConfig(keep=(0.7, 0.5), layers=(3,), output="tokens"))
    assert tokens.operations == (BlockOp(3, "prune", 138), BlockOp(10, "select", 98))
    assert tokens.pruned_layers == tokens.kept_index_layers == ((3, 138),)
    assert tokens.selection_layers == ((3, 138), (10, 98))
    assert make_plan(197, 1, VIT_B, PruneConfig(keep=1.0, output="tokens")).operations == ()


@pytest.mark.parametrize(
    "config",
    [
        PruneConfig(keep=0.7, layers=(3, 6, 9), fuse=True),
        PruneConfig(keep=0.7, layers=(3, 6, 9), merge=True),
        PruneConfig(keep=1.0, tome=(60, 0, 60, 60), layers=(0, 1, 5, 11)),
        PruneConfig(keep=(0.7, 0.5), layers=(3,), output="tokens"),
        PruneConfig(keep=1.0, output="tokens"),
    ],
)
def test_plan_json_lists_the_operations_and_older_json_still_loads(config: PruneConfig) -> None:
    plan = make_plan(197, 1, VIT_B, config)
    data = json.loads(plan.to_json())
    assert data["operations"] == [[op.layer, op.kind, op.count] for op in plan.operations]
    loaded = KeepPlan.from_dict(data)
    assert loaded.operations == plan.operations
    # export.json written before plans listed their operations: the same operations from the counts.
    del data["operations"]
    assert KeepPlan.from_dict(data) == loaded
