"""The contract with timm: the version range, and what each registered adapter relies on, checked
against timm's own forwards (colln.models.adapters runs the blocks in two halves and reads the
attention probabilities and keys by hooks)."""

import pytest
import timm
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from timm.models.eva import Eva
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from colln.models import adapters


def test_timm_version_is_in_the_supported_range() -> None:
    assert Version(timm.__version__) in SpecifierSet(adapters.SUPPORTED_TIMM)


def test_pyproject_pins_the_same_range() -> None:
    from pathlib import Path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"timm{adapters.SUPPORTED_TIMM}"' in pyproject


def _explicit_probs(attn: torch.nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax(q k^T * scale) written out from the attention's weights (the independent reference)."""
    b, n, _ = x.shape
    h = attn.num_heads
    if getattr(attn, "qkv", None) is not None:
        qkv = torch.nn.functional.linear(x, attn.qkv.weight, _qkv_bias(attn))
        q, k, _ = qkv.reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
    else:
        q = attn.q_proj(x).reshape(b, n, h, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, getattr(attn, "num_kv_heads", h), -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        p = attn.num_prefix_tokens
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=attn.rotate_half)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=attn.rotate_half)], dim=2)
    k = k.repeat_interleave(h // k.shape[1], dim=1)  # grouped-query attention: kv head h // groups
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


def _qkv_bias(attn: torch.nn.Module) -> torch.Tensor | None:
    if getattr(attn, "q_bias", None) is not None:
        return torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
    return attn.qkv.bias


BLOCKS = {
    "vit": lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, qk_norm=True),
    "vit_layerscale": lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, init_values=0.3),
    "vit_respost": lambda: VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, block_fn=ResPostBlock
    ),
    "eva_rope": lambda: Eva(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, use_rot_pos_emb=True, init_values=0.2),
    "eva_swiglu_sep_qkv": lambda: Eva(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=4,
        qkv_fused=False,
        swiglu_mlp=True,
        scale_mlp=True,
        use_rot_pos_emb=True,
        rope_rotate_half=True,
    ),
    "eva_rope_attn_gqa": lambda: Eva(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=4,
        attn_type="rope",
        qkv_fused=False,
        num_kv_heads=2,
        qk_norm=True,
        use_rot_pos_emb=True,
        rope_type="dinov3",
    ),
    "eva_post_norm": lambda: Eva(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, use_post_norm=True),
    "eva_gated": lambda: _gated(Eva(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, use_rot_pos_emb=True)),
}


def _gated(model: Eva) -> Eva:
    """Gated attention (Qwen3-Next style) exists at block level only."""
    from timm.models.eva import EvaBlock

    model.blocks[0] = EvaBlock(32, 4, attn_type="rope", gated_attn=True, num_prefix_tokens=1)
    return model


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_adapter_halves_and_probe_equal_timms_own_block(name: str) -> None:
    """attend + mlp equal the block's own forward; the probed probabilities equal softmax(q k^T) written
    out, rotary positions included; hooks leave the output unchanged."""
    torch.manual_seed(0)
    model = BLOCKS[name]().eval()
    for p in model.parameters():  # non-zero biases and layer scales: every term counts
        torch.nn.init.normal_(p, std=0.2) if p.dim() == 1 else None
    adapter = adapters.model_adapter(model)
    x, positions = adapter.embed(model, torch.randn(2, 3, 32, 32))
    rope = positions.at(0) if positions is not None else None
    block = model.blocks[0]
    block_adapter = adapters.block_adapter(block, 0)
    with torch.no_grad():
        kwargs = {"rope": rope} if isinstance(model, Eva) else {}
        expected = block(x, **kwargs)
        probe = adapters.Probe(block_adapter, block)
        att = probe.attend(block, x, rope, None)
        assert torch.allclose(block_adapter.mlp(block, att.x), expected, atol=1e-5)
        post_norm = type(block).__name__ in ("ResPostBlock", "EvaBlockPostNorm")
        normed = x if post_norm else block.norm1(x)
        assert torch.allclose(att.probs, _explicit_probs(block.attn, normed, rope), atol=1e-5)
        assert att.keys.shape[:2] == x.shape[:2]


def test_positions_follow_matches_timms_keep_indices() -> None:
    """Positions.follow gathers the same rows as timm's apply_keep_indices_nlc, shared and per-block tables."""
    from timm.layers.pos_embed_sincos import apply_keep_indices_nlc

    torch.manual_seed(0)
    x = torch.randn(3, 10, 8)
    order = torch.stack([torch.randperm(10)[:6] for _ in range(3)])
    shared = torch.randn(10, 16)
    got = adapters.Positions(shared).follow(order).table
    assert torch.equal(got, apply_keep_indices_nlc(x, shared, order).unsqueeze(1))
    per_block = torch.randn(4, 2, 10, 16)  # [depth, heads, N, dim]
    got = adapters.Positions(per_block, per_block=True).follow(order).table
    assert torch.equal(got, apply_keep_indices_nlc(x, per_block, order).transpose(0, 1))
    again = adapters.Positions(per_block, per_block=True).follow(order).follow(torch.tensor([[1, 0]] * 3)).table
    assert torch.equal(again, got[:, :, :, [1, 0]])
