"""The modern timm families (Eva: EVA-02, DINOv3, PE, ROPE-ViT; NaFlexVit) pruned, merged and with
dense output, against a plain per-image reference written from the method's definition: timm's
own blocks run on each image's kept tokens with the rotary rows of those tokens, the Col-Ln score
computed from softmax(q k^T) written out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva

import colln
from colln.models import adapters, coverage
from colln.models.plan import default_layers

DOCS = Path(__file__).parents[1] / "docs" / "reference" / "models.md"

EVAS = {
    "rope_cat": dict(use_rot_pos_emb=True, ref_feat_shape=(8, 8)),
    "rope_half_swiglu_sep_qkv": dict(
        use_rot_pos_emb=True, rope_rotate_half=True, qkv_fused=False, swiglu_mlp=True, scale_mlp=True
    ),
    "rope_mixed": dict(use_rot_pos_emb=True, rope_type="mixed", use_abs_pos_emb=False, init_values=0.3),
    "dinov3_registers": dict(
        use_rot_pos_emb=True, rope_type="dinov3", num_reg_tokens=2, qk_norm=True, attn_type="rope", use_abs_pos_emb=False
    ),
    "no_cls_avg": dict(use_rot_pos_emb=True, class_token=False, global_pool="avg"),
    "post_norm": dict(use_rot_pos_emb=True, use_post_norm=True),
}


def make_eva(variant: str, seed: int = 0) -> Eva:
    """A small Eva with sharp attention (random-init ViTs attend almost uniformly: near-ties)."""
    torch.manual_seed(seed)
    model = Eva(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=5, **EVAS[variant]).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.blocks:
            for name in ("qkv", "q_proj", "k_proj"):
                lin = getattr(blk.attn, name, None)
                if lin is not None:
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.4)
        # Eva initialises its head at 1e-3 scale: logits of order 1 make the tolerances mean something.
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen))
    return model


def _probs(attn: torch.nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale), rotary positions on the patch tokens, written out."""
    b, n, _ = x.shape
    h = attn.num_heads
    if attn.qkv is not None:
        bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]) if getattr(attn, "q_bias", None) is not None else attn.qkv.bias
        q, k, _ = torch.nn.functional.linear(x, attn.qkv.weight, bias).reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
    else:
        q = attn.q_proj(x).reshape(b, n, h, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, h, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p = attn.num_prefix_tokens
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=attn.rotate_half)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=attn.rotate_half)], dim=2)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


def reference(model: Eva, image: torch.Tensor, ks: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One image, plainly: (logits, dense features on the patch grid, the smallest relative top-k margin)."""
    x, rope = model._pos_embed(model.patch_embed(image[None]))
    x = model.norm_pre(x)
    p = model.num_prefix_tokens
    ids = torch.arange(x.shape[1] - p)
    dense = torch.zeros(x.shape[1] - p, x.shape[-1])
    margin = float("inf")
    post = type(model.blocks[0]).__name__ == "EvaBlockPostNorm"
    for i, blk in enumerate(model.blocks):
        table = None if rope is None else (rope[i] if model.rope_mixed else rope)
        rows = None if table is None else table[..., ids, :]
        if i in ks:
            normed = x if post else blk.norm1(x)
            score = (_probs(blk.attn, normed, rows).mean(1)[0, :, p:] ** 4).sum(0) ** 0.25
            top = score.topk(ks[i] + 1).values
            margin = min(margin, float((top[-2] - top[-1]) / top[0]))
            kept = score.topk(ks[i]).indices
            out = blk(x, rope=rows)
            # What a dropped patch had when its block dropped it: the output of the attention residual.
            attended = x + (blk.norm1(blk.attn(x, rope=rows)) if post else _ls(blk.gamma_1, blk.attn(normed, rope=rows)))
            gone = torch.ones(len(ids), dtype=torch.bool)
            gone[kept] = False
            dense[ids[gone]] = attended[0, p:][gone]
            x, ids = torch.cat([out[:, :p], out[:, p:][:, kept]], dim=1), ids[kept]
        else:
            x = blk(x, rope=rows)
    dense[ids] = x[0, p:]
    return model.forward_head(model.norm(x))[0], model.norm(dense), margin


def _ls(gamma: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if gamma is None else gamma * x


def _ks(model: torch.nn.Module) -> dict[int, int]:
    return {op.layer: op.count for op in colln.get_plan(model).operations}


@pytest.mark.parametrize("variant", sorted(EVAS))
def test_pruned_eva_matches_the_plain_reference(variant: str) -> None:
    model = make_eva(variant)
    images = torch.randn(3, 3, 32, 32)
    pruned = colln.prune(model, keep=0.6, layers=(0, 2))
    dense = colln.prune(model, keep=0.6, layers=(0, 2), output="dense")
    with torch.no_grad():
        got, got_dense = pruned(images), dense(images)
        for b in range(len(images)):
            want, want_dense, margin = reference(model, images[b], _ks(pruned))
            assert margin > 1e-4, "a near-tie: the reference cannot decide the kept set"
            torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got_dense[b], want_dense, atol=1e-4, rtol=1e-4)


def test_a_wrong_rotary_gather_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept tokens that took the rows of the first k patches instead of their own: the reference tells."""
    model = make_eva("rope_cat")
    images = torch.randn(3, 3, 32, 32)
    pruned = colln.prune(model, keep=0.6, layers=(0, 2))
    with torch.no_grad():
        want = torch.stack([reference(model, images[b], _ks(pruned))[0] for b in range(3)])
        torch.testing.assert_close(pruned(images), want, atol=1e-4, rtol=1e-4)

        def first_rows(self, order):
            return adapters.Positions(self.table[..., : order.shape[1], :], self.per_block, self.batched)

        monkeypatch.setattr(adapters.Positions, "follow", first_rows)
        assert (pruned(images) - want).abs().max() > 0.05 * want.abs().max()


@pytest.mark.parametrize("variant", ["rope_cat", "rope_mixed", "dinov3_registers"])
def test_keep_one_tome_zero_and_dense_are_the_models_own(variant: str) -> None:
    model = make_eva(variant)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
        torch.testing.assert_close(colln.prune(model, keep=1.0)(images), logits, atol=0, rtol=0)
        torch.testing.assert_close(colln.tome(model, 0)(images), logits, atol=0, rtol=0)
        features = model.forward_features(images)[:, model.num_prefix_tokens :]
        torch.testing.assert_close(colln.prune(model, keep=1.0, output="dense")(images), features, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["merge", "tome"])
def test_merged_tokens_keep_the_angles_of_the_token_they_join(method: str) -> None:
    """A merged model's per-image rotary rows are the rows of the tokens that continue: checked by
    running every image alone (positions gathered per image) against the batch."""
    model = make_eva("rope_cat")
    images = torch.randn(3, 3, 32, 32)
    reduced = colln.tome(model, 8) if method == "tome" else colln.prune(model, keep=0.6, layers=(0, 2), merge=True)
    seen = []

    def spy(self, order):
        seen.append(order)
        return real(self, order)

    real = adapters.Positions.follow
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapters.Positions, "follow", spy)
        batch = reduced(images)
        singles = torch.cat([reduced(images[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    assert seen and all(o.dtype == torch.long for o in seen)
    # Two steps compose: the rows after both follow the ids the orders pick.
    table = adapters.Positions(torch.arange(64.0)[:, None].expand(64, 2).contiguous())
    ids = torch.arange(64).expand(3, 64)
    for order in seen[:2]:
        table, ids = table.follow(order), ids.gather(-1, order)
    assert torch.equal(table.table[:, 0, :, 0].long(), ids)


def test_fuse_is_refused_where_every_token_needs_a_position() -> None:
    with pytest.raises(colln.CollnError, match="--fuse adds a token that is no patch"):
        colln.prune(make_eva("rope_cat"), keep=0.5, fuse=True)


def test_every_backbone_is_accepted_or_refused_as_the_docs_say() -> None:
    """Every model of timm's ViT backbone modules, built on the meta device: at least 95% accepted,
    none crashing, and each refusal listed in docs/reference/models.md with its reason."""
    found = list(coverage.verdicts(coverage.BACKBONE_MODULES))
    accepted = sum(v.accepted for v in found)
    assert accepted / len(found) >= 0.95, f"{accepted} of {len(found)} accepted"
    assert coverage.undocumented(found, DOCS.read_text()) == []


def test_naflexvit_at_its_fixed_size_equals_timm_and_prunes() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("naflexvit_base_patch16_gap", img_size=32, embed_dim=32, depth=4, num_heads=2, num_classes=3)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(colln.prune(model.eval(), keep=1.0)(images), model(images), atol=0, rtol=0)
        pruned = colln.prune(model, keep=0.5, layers=default_layers(4))
        assert pruned(images).shape == (2, 3)
    assert colln.get_plan(pruned).token_steps == "8 -> 6 -> 5 -> 5"


def test_trained_digits_eva_pruned_accuracy_matches_the_reference() -> None:
    """The bundled RoPE model (trained on digits: clear margins), Col-Ln keep 0.7 at blocks 2, 4, 6:
    colln's batched model and the plain per-image reference predict alike, image by image."""
    from colln.data import validation_images
    from colln.models.registry import load_model

    model = load_model("digits_eva")
    val = validation_images("digits_eva", model, None, 120)
    pruned = colln.prune(model, keep=0.7, layers=(2, 4, 6))
    images = torch.from_numpy(val.images)
    with torch.no_grad():
        got = pruned(images).argmax(-1)
        refs = [reference(model, images[b], _ks(pruned)) for b in range(len(images))]
    want = torch.stack([r[0].argmax(-1) for r in refs])
    clear = torch.tensor([r[2] > 1e-4 for r in refs])
    assert clear.sum() >= 100, "the trained model should leave few near-ties"
    assert torch.equal(got[clear], want[clear])
    labels = torch.from_numpy(val.labels)
    assert abs(float((got == labels).float().mean()) - float((want == labels).float().mean())) <= (~clear).float().mean()
    assert float((got == labels).float().mean()) > 0.85
