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
from dataclasses import dataclass, replace

import torch
from torch import nn

from colln.errors import UnsupportedModelError
from colln.models.config import PruneConfig
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

    def flat_keys(self, keys: torch.Tensor) -> tuple[torch.Tensor, int]:
        """What ``k_norm`` put out, as ``([B, N, H_kv * head_dim], H_kv)``: timm's attentions norm
        ``[B, H, N, D]``."""
        b, h, n, d = keys.shape
        return keys.transpose(1, 2).reshape(b, n, h * d), h

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
        # The selection computes in at least fp32 (fp16 / bf16 probabilities are promoted), float64 in a
        # float64 model (validation measures fp32's own error on the scores against it).
        return Attended(out, probs.to(torch.promote_types(probs.dtype, torch.float32)), *self.adapter.flat_keys(keys))


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


class RopePreNormBlock(BlockAdapter):
    """A pre-norm block whose attention takes RoPE and has no LayerScale: DeepSeek's
    ``DeepseekVitBlock`` (timm's ``AttentionRope`` and a SwiGLU MLP)."""

    def attend(self, block, x, rope, bias):
        return x + block.drop_path1(block.attn(block.norm1(x), rope=rope, attn_mask=bias))

    def mlp(self, block, x):
        return x + block.drop_path2(block.mlp(block.norm2(x)))


class SandwichBlock(BlockAdapter):
    """Gemma 4's ``Gemma4Block``: four norms, ``x + norm2(attn(norm1(x)))`` then
    ``x + norm4(mlp(norm3(x)))``; its attention takes RoPE as ``(cos, sin)`` (the rotary table
    carries both, concatenated on the last axis) and norms keys ``[B, N, H_kv, D]``."""

    def attend(self, block, x, rope, bias):
        table = rope.reshape(-1, *rope.shape[-2:])  # [N, 2D] or per image [B, 1, N, 2D] -> [1 or B, N, 2D]
        cos, sin = table.chunk(2, dim=-1)
        return x + block.drop_path(block.norm2(block.attn(block.norm1(x), cos, sin, attn_mask=bias)))

    def mlp(self, block, x):
        return x + block.drop_path(block.norm4(block.mlp(block.norm3(x))))

    def flat_keys(self, keys):
        b, n, h, d = keys.shape
        return keys.reshape(b, n, h * d), h


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
    towers = _tower_modules()
    if "gemma4_vit" in towers:
        register_attention(towers["gemma4_vit"].Gemma4Attention)
        register_block(towers["gemma4_vit"].Gemma4Block, adapter=SandwichBlock())
    if "deepseek_vit" in towers:
        register_block(towers["deepseek_vit"].DeepseekVitBlock, adapter=RopePreNormBlock())
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


def _tower_modules() -> dict[str, object]:
    """timm's VLM tower modules this timm has (1.0.31 ships all three; older ones none). Qwen3-VL's
    blocks are EvaBlocks."""
    import importlib
    import importlib.util

    return {
        name: importlib.import_module(f"timm.models.{name}")
        for name in ("qwen3_vit", "gemma4_vit", "deepseek_vit")
        if importlib.util.find_spec(f"timm.models.{name}") is not None
    }


def block_adapter(
    block: nn.Module,
    index: int,
) -> BlockAdapter:
    """The registered adapter of ``block`` (checked), or a one-line refusal."""
    _register_timm()
    adapter = _BLOCKS.get(type(block))
    if adapter is None:
        raise UnsupportedModelError(
            f"block {index} is a {type(block).__name__}: colln runs timm's "
            f"{', '.join(sorted(t.__name__ for t, a in _BLOCKS.items() if not isinstance(a, Refused)))}"
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
    #: The feature layer of ``--output tokens`` when none is given (``None``: LLaVA's -2).
    feature_layer: int | None = None

    def check(self, model: nn.Module, config: PruneConfig) -> None:
        if getattr(model, "global_pool", None) == "" and config.output == "logits":
            raise UnsupportedModelError(
                "global_pool='' returns every token and pruning would change that output's shape; "
                "use a pooled head, or --output tokens / dense"
            )

    def blocks(self, model: nn.Module) -> nn.Module:
        return model.blocks

    def set_blocks(self, model: nn.Module, blocks: nn.Module) -> None:
        model.blocks = blocks

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

    def tokens(self, model: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``--output tokens``' outputs from the feature block's kept patch tokens ``x`` and their
        ids: ``(tokens, indices)``."""
        return x, ids

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


class TowerModel(ModelAdapter):
    """A VLM's vision tower (timm's Qwen3-VL, Gemma 4 and DeepSeek towers: their ``*VitEncoder`` and
    the ``*VitClassifier`` around one): no prefix token, rotary positions, and, where the tower has
    one, a spatial projector (Qwen3-VL's ``merger``, Gemma 4's soft-token ``pooler``, DeepSeek's
    ``aligner``) that joins each k x k group of patches into one of the language model's tokens.

    With a projector colln keeps whole groups: the embedding lays each group's patches side by side
    (group-major: groups row-major over the merged grid, patches row-major inside a group), every
    selection scores a group by the sum of its patches' scores and keeps or drops it whole
    (:func:`colln.models.ops.group_scores`), and the plan counts groups, the language model's tokens.
    The tower's own projector then runs on the kept groups. ``--output tokens`` returns
    ``(tokens, indices, positions)``: the projector's rows, their ids on the merged grid and their
    ``(row, col)`` there."""

    #: The tower's own output (the last block's, what its projector reads).
    feature_layer = -1

    def encoder(self, model: nn.Module) -> nn.Module:
        """The tower itself (a classifier wraps it as ``encoder``)."""
        return getattr(model, "encoder", model)

    def blocks(self, model):
        return self.encoder(model).blocks

    def set_blocks(self, model, blocks):
        self.encoder(model).blocks = blocks

    def num_prefix(self, model):
        return 0

    def has_cls(self, model):
        return False

    def has_positions(self, model):
        return True

    def side(self, model: nn.Module) -> int:
        """k of the projector's k x k groups (1 without a projector)."""
        raise NotImplementedError

    def patch_grid(self, model: nn.Module) -> tuple[int, int]:
        return tuple(self.encoder(model).patch_embed.grid_size)

    def grid(self, model):
        """The merged grid: one cell per group, the token grid of the output."""
        (h, w), k = self.patch_grid(model), self.side(model)
        return h // k, w // k

    def check(self, model, config):
        name = type(model).__name__
        if config.output == "logits" and self.encoder(model) is model:
            raise UnsupportedModelError(f"{name} is a VLM tower without a classifier head: use --output tokens")
        if config.output == "dense":
            raise UnsupportedModelError(f"{name} is a VLM tower: --output dense is not supported, use --output tokens")
        (h, w), k = self.patch_grid(model), self.side(model)
        if h % k or w % k:
            raise UnsupportedModelError(
                f"{name}'s {h}x{w} patch grid does not split into its projector's {k}x{k} groups: "
                f"use an image size whose patch grid is a multiple of {k}"
            )
        if k > 1 and (config.merge or config.merges):
            raise UnsupportedModelError(
                f"{name} keeps whole {k}x{k} groups for its projector, and merging joins tokens across groups: "
                "prune (Col-Ln) without --merge or --tome"
            )

    def patches(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens ``[B, N, C]`` in raster order, with every absolute position embedding the
        tower adds, and the rotary table ``[N, D]`` in the layout its blocks take."""
        raise NotImplementedError

    def embed(self, model, images):
        x, table = self.patches(model, images)
        k = self.side(model)
        if k == 1:
            return x, Positions(table)
        h, w = self.patch_grid(model)
        order = torch.arange(h * w, device=x.device).reshape(h // k, k, w // k, k).transpose(1, 2).reshape(-1)
        return x.index_select(1, order), Positions(table.index_select(-2, order))

    def features(self, model, x):
        return x

    def project(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The tower's projector on the tokens of whole groups ``[B, G * k * k, C]`` (group-major)
        -> ``[B, G, C_out]``; without a projector the tokens themselves."""
        k = self.side(model)
        if k == 1:
            return x
        b, n, c = x.shape
        # The groups side by side on a k-row strip [B, k, G * k, C]: the projector's own k x k
        # partition of that strip is exactly the kept groups, in their order.
        strip = x.reshape(b, n // (k * k), k, k, c).transpose(1, 2).reshape(b, k, n // k, c)
        return self.project_strip(model, strip)

    def project_strip(self, model: nn.Module, strip: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, model, x):
        return model.forward_head(self.project(model, x))

    def tokens(self, model, x, ids):
        g = self.side(model) ** 2
        group_ids = ids if g == 1 else ids[:, ::g] // g
        w = self.grid(model)[1]
        positions = torch.stack([group_ids // w, group_ids % w], dim=-1)
        return self.project(model, self.features(model, x)), group_ids, positions

    def drop_head(self, model, keep_norm=False):
        # A classifier's own norm and head; the tower's final norm and projector make its tokens.
        if self.encoder(model) is not model:
            super().drop_head(model, keep_norm)

    def patch_macs(self, model):
        return math.prod(self.patch_grid(model)) * self.patch_proj(model).weight.numel()

    def patch_proj(self, model: nn.Module) -> nn.Module:
        return self.encoder(model).patch_embed.proj

    def dims(self, model):
        """Per group of k x k patches (the plan's unit): a group is k*k tokens in every block, so
        the per-token MACs scale by k*k and the attention's N^2 term by (k*k)^2."""
        dims = super().dims(model)
        g = self.side(model) ** 2
        return replace(
            dims,
            attn_dim=dims.attn_dim * g * g,
            attn_linear_macs=dims.attn_linear_macs * g,
            mlp_macs=dims.mlp_macs * g,
            group=g,
            token_grid=self.grid(model),
        )


class QwenTower(TowerModel):
    """Qwen3-VL / Qwen3.5's tower: EvaBlocks with axial 2D RoPE ('half'), a learned grid position
    embedding, and a 2x2 ``merger`` (norm, pixel-unshuffle, MLP into the LM's width)."""

    family = "Qwen3Vit"

    def side(self, model):
        merger = self.encoder(model).merger
        return 1 if merger is None else merger.merge_size

    def patches(self, model, images):
        enc = self.encoder(model)
        return enc._pos_embed(enc.patch_embed(images))

    def project_strip(self, model, strip):
        return self.encoder(model).merger(strip)


class DeepseekTower(QwenTower):
    """DeepSeek's tower: pre-norm RMSNorm blocks with axial 2D RoPE ('half'), no learned position
    embedding, a final norm, and a 3x3 ``aligner`` (pixel-unshuffle, MLP into the LM's width)."""

    family = "DeepseekVit"

    def side(self, model):
        aligner = self.encoder(model).aligner
        return 1 if aligner is None else aligner.downsample_ratio

    def features(self, model, x):
        return self.encoder(model).norm(x)

    def project_strip(self, model, strip):
        return self.encoder(model).aligner(strip)


class GemmaTower(TowerModel):
    """Gemma 4's tower: sandwich-norm blocks with 2D RoPE (a ``(cos, sin)`` pair, carried here as one
    table), a 2D position-embedding table, and the k x k soft-token ``pooler`` (mean, times sqrt(D),
    then the tower's standardisation where it has one)."""

    family = "Gemma4Vit"

    def side(self, model):
        enc = self.encoder(model)
        return enc.pooling_kernel_size if enc.global_pool == "soft" else 1

    def patch_grid(self, model):
        _, h, w = model.pretrained_cfg["input_size"]
        ph, pw = self.encoder(model).patch_size
        return h // ph, w // pw

    def patches(self, model, images):
        enc = self.encoder(model)
        x, position_ids, _ = enc.patch_embed(images)
        cos, sin = enc.rotary_emb(x, position_ids)
        return x, torch.cat([cos, sin], dim=-1)[0]

    def project_strip(self, model, strip):
        enc = self.encoder(model)
        b, k, width, c = strip.shape
        # The pooler bins tokens by their (x, y) positions: the strip's own, raster order.
        t = torch.arange(k * width, device=strip.device)
        position_ids = torch.stack([t % width, t // width], dim=-1).expand(b, -1, -1)
        x, _ = enc.pooler(strip.reshape(b, k * width, c), position_ids, None)
        return x if enc.std_bias is None else (x - enc.std_bias) * enc.std_scale

    def patch_proj(self, model):
        return self.encoder(model).patch_embed.input_proj


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
    towers = _tower_modules()
    for module, prefix, adapter in (
        ("qwen3_vit", "Qwen3Vit", QwenTower()),
        ("gemma4_vit", "Gemma4Vit", GemmaTower()),
        ("deepseek_vit", "DeepseekVit", DeepseekTower()),
    ):
        if module in towers:
            register_model(
                getattr(towers[module], f"{prefix}Encoder"), getattr(towers[module], f"{prefix}Classifier"), adapter=adapter
            )


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
