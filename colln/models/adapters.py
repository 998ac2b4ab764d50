"""Block and model adapters: what colln needs to know of each timm model family, and nothing else.

A **block adapter** runs one family of timm blocks in the two halves the EViT framework prunes
between: the attention residual (through the attention module's own forward, with its softmax
probabilities and keys read by hooks on its ``attn_drop`` and ``k_norm`` submodules) and the MLP
residual. A **model adapter** runs a family's embedding (tokens, and rotary positions where the
family has them) and its head. Both are registered by class, so a new family adds an adapter,
never a branch, and nothing here copies a timm forward body beyond the block's two residual sums.
Anything colln cannot run is refused in one line naming the class and why.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from colln.errors import UnsupportedModelError
from colln.models.plan import ModelDims

_logger = logging.getLogger(__name__)

# Tested in tests/test_timm_contract.py: the timm versions whose internals these adapters follow.
SUPPORTED_TIMM = ">=1.0.15,<1.1"
# The attention modules colln reads (registered below): on their non-fused path the softmax
# probabilities enter ``attn_drop`` and the keys leave ``k_norm`` (before any rotation). A look-alike
# is not enough: timm's DiffAttention has the same submodules, but a difference of two softmaxes.
_ATTENTIONS: set[type] = set()


@dataclass(frozen=True)
class Positions:
    """A rotary position table that follows the tokens it belongs to: ``table``'s second-last axis
    indexes the patch tokens (prefix tokens are never rotated), ``per_block`` tables carry one
    slice per block first (timm's depth-dependent ``rope_mixed``), ``batched`` ones one per image
    (after a selection, each image keeps the rows of its own kept tokens)."""

    table: torch.Tensor
    per_block: bool = False
    batched: bool = False

    def at(self, block: int) -> torch.Tensor:
        """The table block ``block`` attends with, in the layout timm's attention takes."""
        return self.table[block] if self.per_block else self.table

    def follow(self, order: torch.Tensor) -> Positions:
        """The rows of the tokens at ``order`` ``[B, k]`` (indices into the current patch tokens),
        per image: a merged or kept token keeps its own angles. A constant-shape gather, no Scatter."""
        table = self.table
        b, k = order.shape
        if not self.batched:
            # [N, D] -> [B, 1, N, D] (a head axis, as timm adds); per block [depth, H, N, D] -> [depth, B, H, N, D]
            table = table.unsqueeze(1) if self.per_block else table.unsqueeze(0)
            if not self.per_block and table.ndim == 3:
                table = table.unsqueeze(1)
            shape = list(table.shape)
            shape[1 if self.per_block else 0] = b
            table = table.expand(shape)
        index = order[None, :, None, :, None] if self.per_block else order[:, None, :, None]
        return Positions(table.gather(-2, index.expand(*table.shape[:-2], k, table.shape[-1])), self.per_block, batched=True)


class Tap:
    """Keeps what a hooked submodule last saw: its input (``attn_drop``: the softmax probabilities)
    or its output (``k_norm``: the normalised keys). A forward hook registered once when colln wraps
    a block; the wrapper reads it right after calling the attention."""

    def __init__(self, take_input: bool) -> None:
        self.take_input = take_input
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.value = args[0] if self.take_input else output


@dataclass(frozen=True)
class Attended:
    """One attention residual: ``x`` after it ``[B, N, C]``, the probabilities ``[B, H, N, N]``
    (fp32) and the keys ``[B, N, H_kv * head_dim]`` (after ``k_norm``, before any rotation: the
    content the merges compare)."""

    x: torch.Tensor
    probs: torch.Tensor
    keys: torch.Tensor
    key_heads: int


class BlockAdapter:
    """How colln runs one family of blocks. ``attend`` is the attention residual, ``mlp`` the MLP
    residual; ``rope`` is the table the block attends with (``None`` without RoPE) and ``bias`` an
    additive attention bias (ToMe's proportional attention: log token sizes)."""

    def check(self, block: nn.Module, index: int) -> None:
        attn = self.attention(block)
        if type(attn) not in _ATTENTIONS:
            names = ", ".join(sorted(t.__name__ for t in _ATTENTIONS))
            raise UnsupportedModelError(
                f"block {index} uses {type(attn).__name__}, whose attention probabilities colln cannot read: "
                f"colln reads those of {names}"
            )

    def attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def attend(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def mlp(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """The whole block with positions or a bias (without either, the block's own forward)."""
        return self.mlp(block, self.attend(block, x, rope, bias))

    def dims(self, block: nn.Module) -> tuple[int, int, int]:
        """``(attn_dim, attention linear MACs per token, MLP MACs per token)``."""
        attn = self.attention(block)
        return attn.num_heads * _head_dim(attn), linear_macs(attn), linear_macs(block.mlp)


class Probe:
    """Hooks on one block's attention that expose its probabilities and keys (see :class:`Tap`).
    The attention is switched to its non-fused path for good: fused SDPA has no probabilities."""

    def __init__(self, adapter: BlockAdapter, block: nn.Module) -> None:
        attn = adapter.attention(block)
        attn.fused_attn = False
        self.adapter = adapter
        self.probs, self.keys = Tap(take_input=True), Tap(take_input=False)
        attn.attn_drop.register_forward_hook(self.probs)
        attn.k_norm.register_forward_hook(self.keys)

    def attend(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, bias: torch.Tensor | None) -> Attended:
        out = self.adapter.attend(block, x, rope, bias)
        probs, keys = self.probs.value, self.keys.value
        self.probs.value = self.keys.value = None
        b, h, n, d = keys.shape
        return Attended(out, probs.float(), keys.transpose(1, 2).reshape(b, n, h * d), h)


class PreNormBlock(BlockAdapter):
    """timm's ``Block``: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def attend(self, block, x, rope, bias):
        return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=bias)))

    def mlp(self, block, x):
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def forward(self, block, x, rope, bias):
        return block(x) if bias is None else super().forward(block, x, rope, bias)


class PostNormBlock(BlockAdapter):
    """timm's ``ResPostBlock``: ``x + norm1(attn(x))``, then ``x + norm2(mlp(x))``."""

    def attend(self, block, x, rope, bias):
        return x + block.drop_path1(block.norm1(block.attn(x, attn_mask=bias)))

    def mlp(self, block, x):
        return x + block.drop_path2(block.norm2(block.mlp(x)))


class EvaPreNormBlock(BlockAdapter):
    """timm's ``EvaBlock`` (EVA-02, DINOv3, PE, ROPE-ViT, NaFlex with RoPE): RoPE passed to the
    attention, LayerScale as ``gamma_1`` / ``gamma_2`` (either may be absent)."""

    def attend(self, block, x, rope, bias):
        out = block.attn(block.norm1(x), rope=rope, attn_mask=bias)
        return x + block.drop_path1(out if block.gamma_1 is None else block.gamma_1 * out)

    def mlp(self, block, x):
        out = block.mlp(block.norm2(x))
        return x + block.drop_path2(out if block.gamma_2 is None else block.gamma_2 * out)

    def forward(self, block, x, rope, bias):
        return block(x, rope=rope, attn_mask=bias)


class EvaPostNormBlock(BlockAdapter):
    """timm's ``EvaBlockPostNorm``: ``x + norm1(attn(x))``, then ``x + norm2(mlp(x))``."""

    def attend(self, block, x, rope, bias):
        return x + block.drop_path1(block.norm1(block.attn(x, rope=rope, attn_mask=bias)))

    def mlp(self, block, x):
        return x + block.drop_path2(block.norm2(block.mlp(x)))

    def forward(self, block, x, rope, bias):
        return block(x, rope=rope, attn_mask=bias)


class Refused(BlockAdapter):
    """A block family colln cannot split, with the reason."""

    def __init__(self, why: str) -> None:
        self.why = why

    def check(self, block: nn.Module, index: int) -> None:
        raise UnsupportedModelError(f"block {index} is a {type(block).__name__}: {self.why}")


_BLOCKS: dict[type, BlockAdapter] = {}


def register_block(*types: type, adapter: BlockAdapter) -> None:
    """Register ``adapter`` for blocks of exactly these classes."""
    for t in types:
        _BLOCKS[t] = adapter


def register_attention(*types: type) -> None:
    """Attention classes whose probabilities enter ``attn_drop`` and keys leave ``k_norm``."""
    _ATTENTIONS.update(types)


def _register_timm() -> None:
    if _BLOCKS:
        return
    from timm.layers import Attention, AttentionRope
    from timm.models import eva, vision_transformer

    register_attention(Attention, AttentionRope, eva.EvaAttention)
    register_block(vision_transformer.Block, adapter=PreNormBlock())
    register_block(vision_transformer.ResPostBlock, adapter=PostNormBlock())
    register_block(eva.EvaBlock, adapter=EvaPreNormBlock())
    register_block(eva.EvaBlockPostNorm, adapter=EvaPostNormBlock())
    parallel = (
        "its attention and MLP read the same input and share one fused input projection, so the MLP cannot run "
        "on the kept tokens alone; prune another model or choose blocks of another kind"
    )
    for name in ("ParallelScalingBlock", "DiffParallelScalingBlock"):
        if hasattr(vision_transformer, name):
            register_block(getattr(vision_transformer, name), adapter=Refused(parallel))
    register_block(
        vision_transformer.ParallelThingsBlock,
        adapter=Refused(
            "its parallel attention branches have no single attention matrix to score, and colln does not merge them"
        ),
    )


def block_adapter(
    block: nn.Module,
    index: int,
) -> BlockAdapter:
    """The registered adapter of ``block`` (checked), or a one-line refusal."""
    _register_timm()
    adapter = _BLOCKS.get(type(block))
    if adapter is None:
        raise UnsupportedModelError(
            f"block {index} is a {type(block).__name__}: colln runs timm's Block, ResPostBlock, EvaBlock and EvaBlockPostNorm"
        )
    adapter.check(block, index)
    return adapter


def linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _head_dim(attn: nn.Module) -> int:
    return getattr(attn, "head_dim", None) or attn.qkv.out_features // 3 // attn.num_heads


class ModelAdapter:
    """How colln runs one family of models around its blocks."""

    #: The family's name in refusals and docs.
    family: str = ""
    #: With logits output the pruned model stays the model's own class (its forward threads plain
    #: tokens through one ``nn.Sequential`` of blocks and it has no positions to carry).
    in_place_logits: bool = False

    def check(self, model: nn.Module, output: str) -> None:
        if getattr(model, "global_pool", None) == "" and output == "logits":
            raise UnsupportedModelError(
                "global_pool='' returns every token and pruning would change that output's shape; "
                "use a pooled head, or --output tokens / dense"
            )

    def blocks(self, model: nn.Module) -> nn.Module:
        return model.blocks

    def has_positions(self, model: nn.Module) -> bool:
        """Whether patch tokens carry rotary positions that must follow them."""
        return getattr(model, "rope", None) is not None

    def num_prefix(self, model: nn.Module) -> int:
        return model.num_prefix_tokens

    def has_cls(self, model: nn.Module) -> bool:
        return getattr(model, "cls_token", None) is not None

    def grid(self, model: nn.Module) -> tuple[int, int]:
        return tuple(model.patch_embed.grid_size)

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, Positions | None]:
        """Tokens entering block 0 ``[B, prefix + patches, C]`` and their rotary positions."""
        raise NotImplementedError

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The final norm (``forward_features``' last step)."""
        return model.norm(x)

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits from the normed tokens: pool, fc_norm, head."""
        return model.forward_head(x)

    def drop_head(self, model: nn.Module, keep_norm: bool = False) -> None:
        """Release the head (and unless ``keep_norm`` the final norm) of a tokens or dense model:
        never run, so the model's state holds what the graph uses."""
        for name in ("fc_norm", "head_drop", "head", *(() if keep_norm else ("norm",))):
            if isinstance(getattr(model, name, None), nn.Module):
                setattr(model, name, nn.Identity())
        if hasattr(model, "attn_pool"):
            model.attn_pool = None

    def patch_macs(self, model: nn.Module) -> int:
        proj = model.patch_embed.proj
        n = math.prod(self.grid(model))
        return n * proj.weight.numel() if isinstance(proj, (nn.Conv2d, nn.Linear)) else 0

    def dims(self, model: nn.Module) -> ModelDims:
        blocks = self.blocks(model)
        attn_dim, attn_macs, mlp_macs = block_adapter(blocks[0], 0).dims(blocks[0])
        head = getattr(model, "head", None)
        return ModelDims(
            depth=len(blocks),
            attn_dim=attn_dim,
            attn_linear_macs=attn_macs,
            mlp_macs=mlp_macs,
            patch_macs=self.patch_macs(model),
            head_macs=linear_macs(head) if isinstance(head, nn.Module) else 0,
        )


class VitModel(ModelAdapter):
    """timm's ``VisionTransformer`` (vit_*, deit_*, the hybrids, CLIP/SigLIP/DINOv2 towers)."""

    family = "VisionTransformer"
    in_place_logits = True

    def embed(self, model, images):
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images)))), None


class EvaModel(ModelAdapter):
    """timm's ``Eva`` (EVA-02, DINOv3, PE Core/Spatial/Lang, ROPE-ViT, ...): absolute and rotary
    positions; the rotary table follows the kept tokens (one table, or one per block when mixed)."""

    family = "Eva"

    def embed(self, model, images):
        x, rope = model._pos_embed(model.patch_embed(images))
        positions = None if rope is None else Positions(rope, per_block=bool(getattr(model, "rope_mixed", False)))
        return model.norm_pre(x), positions


class NaFlexModel(ModelAdapter):
    """timm's ``NaFlexVit`` at one fixed image size (the model's input size): standard NCHW images,
    no padding mask, so every image has the same patches and static shapes hold."""

    family = "NaFlexVit"

    def grid(self, model):
        _, h, w = model.pretrained_cfg["input_size"]
        ph, pw = model.embeds.patch_size
        return h // ph, w // pw

    def embed(self, model, images):
        out = model._forward_embeds(images, patch_coord=None, patch_valid=None, attn_mask=None)
        rope = out["rope_embeds"]
        positions = None if rope is None else Positions(rope, per_block=bool(model.rope_is_mixed))
        return out["patches"], positions

    def head(self, model, x):
        return model.forward_head(x)

    def patch_macs(self, model):
        proj = model.embeds.proj
        n = math.prod(self.grid(model))
        return n * proj.weight.numel() if isinstance(proj, (nn.Conv2d, nn.Linear)) else 0


_MODELS: dict[type, ModelAdapter] = {}


def register_model(*types: type, adapter: ModelAdapter) -> None:
    for t in types:
        _MODELS[t] = adapter


def _register_timm_models() -> None:
    if _MODELS:
        return
    from timm.models import eva, naflexvit, vision_transformer

    register_model(vision_transformer.VisionTransformer, adapter=VitModel())
    register_model(eva.Eva, adapter=EvaModel())
    register_model(naflexvit.NaFlexVit, adapter=NaFlexModel())


def model_adapter(
    model: nn.Module,
) -> ModelAdapter:
    """The registered adapter of ``model``'s class (subclasses included), or a one-line refusal."""
    _register_timm_models()
    for cls in type(model).__mro__:
        if cls in _MODELS:
            return _MODELS[cls]
    families = ", ".join(sorted(a.family for a in set(_MODELS.values())))
    raise UnsupportedModelError(f"{type(model).__name__} is not a model family colln runs: it runs timm's {families}")
