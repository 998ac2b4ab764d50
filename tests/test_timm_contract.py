"""The contract with timm: the version range and every attribute colln.models.rewrite relies on."""

import pytest
import timm
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from colln.models import rewrite


def test_timm_version_is_in_the_supported_range() -> None:
    assert Version(timm.__version__) in SpecifierSet(rewrite.SUPPORTED_TIMM)


def test_pyproject_pins_the_same_range() -> None:
    from pathlib import Path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"timm{rewrite.SUPPORTED_TIMM}"' in pyproject


def test_vit_block_and_attention_attributes() -> None:
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, qk_norm=True)
    for name in rewrite.VIT_ATTRS:
        assert hasattr(model, name), f"VisionTransformer.{name}"
    assert isinstance(model.blocks, torch.nn.Sequential)
    assert type(model.blocks[0]) is Block and type(model.blocks[0].attn) is Attention
    for name in rewrite.BLOCK_ATTRS:
        assert hasattr(model.blocks[0], name), f"Block.{name}"
    for name in rewrite.ATTN_ATTRS:
        assert hasattr(model.blocks[0].attn, name), f"Attention.{name}"
    assert model.patch_embed.num_patches == 16
    assert model.num_prefix_tokens == 1


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("options", [{}, {"qk_norm": True}, {"scale_attn_norm": True}])
def test_attention_with_probs_equals_timm_attention(fused: bool, options: dict) -> None:
    """Our probability-exposing path through timm's submodules gives timm's own attention output."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, **options).eval()
    attn = model.blocks[0].attn
    attn.fused_attn = fused
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        out, probs = rewrite.attention_with_probs(attn, x)
        assert torch.allclose(out, attn(x), atol=1e-5)
    assert probs.shape == (2, 4, 17, 17)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 17))


def test_tokens_model_attributes_and_intermediates_convention() -> None:
    """TokenEncoder runs timm's embedding steps itself and drops the head; its feature layer -2 is
    what timm's forward_intermediates takes for index -2: the output of block depth-2, unnormed."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, pre_norm=True).eval()
    for name in (*rewrite.TOKENS_ATTRS, *rewrite.HEAD_ATTRS):
        assert hasattr(model, name), f"VisionTransformer.{name}"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.patch_drop(model._pos_embed(model.patch_embed(x)))
        h = model.blocks[:2](model.norm_pre(h))
        taken = model.forward_intermediates(x, indices=[-2], output_fmt="NLC", intermediates_only=True)[0]
    assert torch.equal(taken, h[:, model.num_prefix_tokens :])
