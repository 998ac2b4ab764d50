"""colln.prune on the timm ViT family, against a plain per-image reference forward."""

import math

import pytest
import timm
import torch
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

import colln
from colln.errors import PlanError, UnsupportedModelError
from colln.models.rewrite import PruningBlock

SMALL = dict(embed_dim=64, depth=6, num_heads=4, num_classes=7)

VARIANTS = {
    "cls": dict(img_size=64, patch_size=8),
    "registers": dict(img_size=64, patch_size=8, reg_tokens=4),
    "no_cls_gap": dict(img_size=64, patch_size=8, class_token=False, global_pool="avg"),
    "map_pool": dict(img_size=64, patch_size=8, class_token=False, global_pool="map"),
    "qk_norm": dict(img_size=64, patch_size=8, qk_norm=True),
    "layer_scale": dict(img_size=64, patch_size=8, init_values=0.5),
    "odd_size": dict(img_size=(40, 56), patch_size=4),
    "no_embed_class": dict(img_size=48, patch_size=6, no_embed_class=True, reg_tokens=2),
}


def _peaky(
    model: VisionTransformer,
    seed: int = 0,
) -> VisionTransformer:
    """Random weights with sharp attention: random-init ViTs attend almost uniformly, which makes
    top-k choices ties that float noise decides. Larger q/k weights give clear score margins."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.blocks:
            w = blk.attn.qkv.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
        for p in model.parameters():
            if p.dim() == 1 and p.numel() > 1 and p is not getattr(model, "cls_token", None):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make(
    variant: str,
) -> VisionTransformer:
    torch.manual_seed(0)
    return _peaky(VisionTransformer(**SMALL, **VARIANTS[variant]))


def _plain_select(
    attn: torch.Tensor,
    num_prefix: int,
    k: int,
    metric: str,
    norm: float,
    rescue: float,
) -> tuple[list[int], list[float], list[float]]:
    """One image: head-mean attention, the metric written out, top-k by sorting. Returns the kept
    candidates and each candidate's fused-token weight (the authors' rule: raw [CLS] attention for
    cls / correct; Col-Ln over the Col-Ln sum of all N columns, prefix included, + 1e-6 for colln)."""
    a = attn.mean(dim=0)  # [N, N]
    n = a.shape[0]
    all_colln = [float((a[:, j] ** norm).sum() ** (1 / norm)) for j in range(n)]
    colln_s = all_colln[num_prefix:]
    cls_s = [float(a[0, j]) for j in range(num_prefix, n)]
    by = lambda s: sorted(range(len(s)), key=lambda j: -s[j])  # noqa: E731
    if metric == "colln":
        return by(colln_s)[:k], colln_s, [s / (sum(all_colln) + 1e-6) for s in colln_s]
    if metric == "cls":
        return by(cls_s)[:k], cls_s, cls_s
    r = math.floor(k * rescue)
    first = by(cls_s)[: k - r]
    rest = [j for j in by(colln_s) if j not in first][:r]
    return first + rest, colln_s, cls_s


def reference_forward(
    model: VisionTransformer,
    x: torch.Tensor,
    layers: dict[int, int],
    metric: str = "colln",
    norm: float = 4.0,
    rescue: float = 0.2,
    fuse: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Unpruned model's modules, pruning written out image by image. Returns logits and the
    smallest score margin at the k-th boundary (so tests can tell real differences from ties)."""
    p = model.num_prefix_tokens
    outs, margins = [], []
    for img in x:
        t = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))
        for i, blk in enumerate(model.blocks):
            if i not in layers:
                t = blk(t)
                continue
            a = blk.attn
            h = blk.norm1(t)
            n = h.shape[1]
            q, kk, v = a.qkv(h).reshape(n, 3, a.num_heads, a.head_dim).permute(1, 2, 0, 3)
            q, kk = a.q_norm(q), a.k_norm(kk)
            attn = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(a.head_dim), dim=-1)
            o = (attn @ v).permute(1, 0, 2).reshape(1, n, -1)
            t = t + blk.ls1(a.proj(a.norm(o)))
            kept, scores, fuse_w = _plain_select(attn, p, layers[i], metric, norm, rescue)
            ranked = sorted(scores, reverse=True)
            if layers[i] < len(scores):
                margins.append(ranked[layers[i] - 1] - ranked[layers[i]])
            rows = [t[0, :p]] + [t[0, p + j][None] for j in kept]
            if fuse:
                fused = sum(fuse_w[j] * t[0, p + j] for j in range(len(scores)) if j not in kept)
                rows.append(fused[None])
            t = torch.cat(rows)[None]
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        outs.append(model.forward_head(model.norm(t)))
    return torch.cat(outs), margins


def _layer_ks(
    pruned: torch.nn.Module,
) -> dict[int, int]:
    plan = colln.get_plan(pruned)
    return dict(zip(plan.layers, plan.keep_counts))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pruned_matches_reference_across_variants(variant: str) -> None:
    model = make(variant)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    pruned = colln.prune(model, keep=0.6, layers=(1, 3))
    with torch.no_grad():
        ref, margins = reference_forward(model, x, _layer_ks(pruned))
        got = pruned(x)
    assert min(margins) > 1e-5, "test input has near-tied scores; pick another seed"
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert not torch.allclose(got, model(x), atol=1e-3), "pruning changed nothing"


def test_distillation_token_model() -> None:
    torch.manual_seed(0)
    model = _peaky(timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=4, num_classes=5))
    assert model.num_prefix_tokens == 2
    x = torch.randn(2, 3, 64, 64)
    pruned = colln.prune(model, keep=0.5, layers=(0, 2))
    with torch.no_grad():
        ref, margins = reference_forward(model, x, _layer_ks(pruned))
        got = pruned(x)
    assert min(margins) > 1e-5
    assert torch.allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("metric", ["cls", "correct"])
@pytest.mark.parametrize("fuse", [False, True])
def test_metrics_and_fusion_match_reference(metric: str, fuse: bool) -> None:
    model = make("cls")
    x = torch.randn(2, 3, 64, 64)
    pruned = colln.prune(model, keep=0.5, layers=(0, 2, 4), metric=metric, fuse=fuse, rescue=0.4)
    with torch.no_grad():
        ref, margins = reference_forward(model, x, _layer_ks(pruned), metric=metric, fuse=fuse, rescue=0.4)
        got = pruned(x)
    assert min(margins) > 1e-6
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def test_fused_colln_matches_reference() -> None:
    model = make("registers")
    x = torch.randn(2, 3, 64, 64)
    pruned = colln.prune(model, keep=0.7, layers=(1, 2, 4), fuse=True, norm=2)
    plan = colln.get_plan(pruned)
    assert plan.tokens_out == plan.num_prefix + plan.keep_counts[-1] + 1
    with torch.no_grad():
        ref, _ = reference_forward(model, x, _layer_ks(pruned), norm=2, fuse=True)
        assert torch.allclose(pruned(x), ref, atol=1e-4)


@pytest.mark.parametrize("variant", ["cls", "registers", "no_cls_gap", "map_pool"])
def test_keep_one_equals_unpruned(variant: str) -> None:
    model = make(variant)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(colln.prune(model, keep=1.0, fuse=True)(x), model(x))


def test_pruning_block_keeping_every_token_equals_timm_block() -> None:
    """The wrapper's own attention path (probabilities exposed) against timm's fused forward."""
    model = make("qk_norm")
    x = torch.randn(2, 3, 64, 64)
    copy = colln.prune(model, keep=0.5, layers=(2,))
    blk = copy.blocks[2]
    blk.k = colln.get_plan(copy).tokens_in[2] - model.num_prefix_tokens  # keep every candidate
    with torch.no_grad():
        assert torch.allclose(copy(x), model(x), atol=1e-5)


def test_original_model_is_untouched() -> None:
    model = make("cls")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = colln.prune(model, keep=0.5)
    assert not any(isinstance(m, PruningBlock) for m in model.modules())
    assert not hasattr(model, "colln_plan")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, PruningBlock) for m in pruned.modules()) == 3
    assert pruned.blocks[2].block is not model.blocks[2]


def test_record_selections_reports_each_pruning_layer() -> None:
    model = make("cls")
    pruned = colln.prune(model, keep=0.5, layers=(1, 3))
    with torch.no_grad(), colln.record_selections(pruned) as sel:
        pruned(torch.randn(2, 3, 64, 64))
    assert [s.layer for s in sel] == [1, 3]
    assert sel[0].indices.shape == (2, 32) and sel[0].scores.shape == (2, 64)
    assert sel[1].indices.shape == (2, 16) and sel[1].scores.shape == (2, 32)
    assert all(blk._recorder is None for blk in pruned.modules() if isinstance(blk, PruningBlock))


def test_refusals_are_one_clear_line() -> None:
    cls_free = make("no_cls_gap")
    cases = [
        (lambda: colln.prune(torch.nn.Linear(3, 3)), UnsupportedModelError, "Linear is not a model family colln runs"),
        (lambda: colln.prune(cls_free, metric="cls"), UnsupportedModelError, "needs a [CLS] token"),
        (lambda: colln.prune(cls_free, metric="correct"), UnsupportedModelError, "needs a [CLS] token"),
        (lambda: colln.prune(make("cls"), layers=(2, 6)), PlanError, "out of range"),
        (lambda: colln.prune(make("cls"), keep=0.0), PlanError, "outside (0, 1]"),
        (lambda: colln.prune(make("cls"), keep=1.2), PlanError, "outside (0, 1]"),
        (lambda: colln.prune(colln.prune(make("cls"))), UnsupportedModelError, "already pruned"),
        (
            lambda: colln.prune(VisionTransformer(**SMALL, img_size=32, patch_size=8, block_fn=ParallelScalingBlock)),
            UnsupportedModelError,
            "block 0 is a ParallelScalingBlock: its attention and MLP read the same input",
        ),
        (
            lambda: colln.prune(VisionTransformer(**SMALL, img_size=32, patch_size=8, attn_layer="diff")),
            UnsupportedModelError,
            "block 0 uses DiffAttention, whose attention probabilities colln cannot read",
        ),
        (lambda: colln.prune(timm.create_model("resnet18")), UnsupportedModelError, "ResNet is not"),
    ]
    for call, error, needle in cases:
        with pytest.raises(error) as info:
            call()
        assert needle in str(info.value)
        assert "\n" not in str(info.value)
