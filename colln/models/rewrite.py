"""The only file that knows timm's ViT internals: wraps chosen blocks of a timm VisionTransformer so
they prune tokens between the attention residual and the MLP.

Module surgery rather than an fx/export trace: timm's VisionTransformer keeps its blocks in an
``nn.Sequential`` and token counts only change inside a block, so wrapping the block (and calling its
own submodules) is the whole rewrite; the graph exporters then see plain tensor ops with constant K.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from colln.errors import UnsupportedModelError
from colln.models import ops
from colln.models.config import PruneConfig
from colln.models.plan import KeepPlan, ModelDims, make_plan

# Tested in tests/test_timm_contract.py: the timm attributes this file relies on.
SUPPORTED_TIMM = ">=1.0.15,<1.1"
BLOCK_ATTRS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
ATTN_ATTRS = (
    "qkv",
    "q_norm",
    "k_norm",
    "attn_drop",
    "norm",
    "proj",
    "proj_drop",
    "num_heads",
    "head_dim",
    "scale",
    "fused_attn",
)
# The tokens model (TokenEncoder) also runs timm's embedding steps and drops the head.
TOKENS_ATTRS = ("_pos_embed", "patch_drop", "norm_pre", "attn_pool")
HEAD_ATTRS = ("norm", "fc_norm", "head_drop", "head")
VIT_ATTRS = ("blocks", "patch_embed", "num_prefix_tokens", "cls_token", "global_pool", "dynamic_img_size", "embed_dim")


def _timm_classes() -> tuple[type, type, type]:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


def attention_with_probs(
    attn: nn.Module,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` through its own submodules, also returning the softmax probabilities
    ``[B, H, N, N]`` (fused SDPA does not expose them). Softmax runs in fp32."""
    out, probs, _ = attention_parts(attn, x)
    return out, probs


def attention_parts(
    attn: nn.Module,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_with_probs` plus the keys ``[B, N, H * head_dim]`` (after ``k_norm``; the
    merge compares tokens by them)."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)
    out = attn.attn_drop(probs.to(v.dtype)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), probs, k.transpose(1, 2).reshape(b, n, -1)


@dataclass(frozen=True)
class Selection:
    """What one pruning block chose for a batch: candidate indices ``[B, k]``, scores ``[B, N_cand]``."""

    layer: int
    indices: torch.Tensor
    scores: torch.Tensor


class PruningBlock(nn.Module):
    """A timm ``Block`` that keeps ``k`` candidate tokens after its attention residual."""

    def __init__(
        self,
        block: nn.Module,
        layer: int,
        num_prefix: int,
        k: int,
        config: PruneConfig,
    ) -> None:
        super().__init__()
        self.block = block
        self.layer = layer
        self.num_prefix = num_prefix
        self.k = k
        self.config = config
        self._recorder: list[Selection] | None = None

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise UnsupportedModelError("attention masks are not supported in pruned blocks (token counts change)")
        return self.forward_kept(x)[0]

    def forward_kept(
        self,
        x: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and the kept candidate indices ``[B, k]`` (a tokens model tracks patch ids by them)."""
        b = self.block
        attn_out, probs = attention_with_probs(b.attn, b.norm1(x))
        x = x + b.drop_path1(b.ls1(attn_out))
        x, indices, scores = ops.prune_tokens(x, probs, self.num_prefix, self.k, self.config)
        self._record(indices, scores)
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))), indices

    def _record(
        self,
        indices: torch.Tensor,
        scores: torch.Tensor,
    ) -> None:
        if self._recorder is not None:
            self._recorder.append(Selection(self.layer, indices, scores))

    def extra_repr(self) -> str:
        c = self.config
        return f"layer={self.layer}, k={self.k}, metric={c.metric}, norm={c.norm}, fuse={c.fuse}"


class FeatureBlock(PruningBlock):
    """The feature block of a tokens model: picks ``k`` patch tokens by the metric on its own
    attention and returns the block's output at them (prefix dropped) with their patch ids.

    Without merge the MLP runs on the kept tokens only (it is per token, so their rows equal the
    full block's); merge needs every token's output."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, p, c = self.block, self.num_prefix, self.config
        attn_out, probs, keys = attention_parts(b.attn, b.norm1(x))
        x = x + b.drop_path1(b.ls1(attn_out))
        indices, scores = ops.select(ops.head_mean(probs), p, self.k, c)
        kept_ids = ids.gather(-1, indices)
        if c.order != "score":
            indices, kept_ids = ops.order_by_patch_id(indices, kept_ids)
        self._record(indices, scores)
        if c.merge:
            x = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
            return ops.merge_tokens(x[:, p:], keys[:, p:], indices, scores), kept_ids
        kept = ops.gather_tokens(x, indices, p)[:, p:]
        return kept + b.drop_path2(b.ls2(b.mlp(b.norm2(kept)))), kept_ids

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merge={self.config.merge}, order={self.config.order or 'spatial'}"


class TokenEncoder(nn.Module):
    """A timm ViT as a VLM vision tower: runs its blocks up to the feature block (the rest are not
    kept) and returns ``(tokens [B, K, C], indices [B, K])``: the feature block's output at the
    kept patch tokens (no final norm, no head, no prefix tokens) and their original patch ids,
    row-major over the patch grid. Patch ids follow the tokens through the inner pruning blocks."""

    def __init__(
        self,
        vit: nn.Module,
        plan: KeepPlan,
    ) -> None:
        super().__init__()
        vit.blocks = vit.blocks[: plan.feature_block + 1]
        # Never run: dropped, so the tower's state holds what the graph uses.
        for name in HEAD_ATTRS:
            setattr(vit, name, nn.Identity())
        vit.attn_pool = None
        self.vit = vit
        self.num_prefix = plan.num_prefix
        self.num_patches = plan.num_patches
        # timm's data config (input size, mean/std) reads it: preprocessing stays the tower's own.
        self.pretrained_cfg = getattr(vit, "pretrained_cfg", {})
        self.colln_plan = plan

    def forward(
        self,
        images: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vit
        # timm's forward_features up to its blocks, through its own methods.
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(images))))
        ids = torch.arange(self.num_patches, device=x.device).unsqueeze(0).expand(x.shape[0], -1)
        for blk in v.blocks:
            if isinstance(blk, FeatureBlock):
                return blk(x, ids)
            if isinstance(blk, PruningBlock):
                x, kept = blk.forward_kept(x)
                ids = ids.gather(-1, kept)
            else:
                x = blk(x)
        # The final selection keeps every patch (keep 1.0): the unpruned encoder cut at the feature block.
        return x[:, self.num_prefix :], ids


def check_supported(
    model: nn.Module,
    layers: Sequence[int] = (),
    metric: str = "colln",
    output: str = "logits",
) -> None:
    """Refuse, in one line, what the rewrite does not support."""
    vit_cls, _, _ = _timm_classes()
    if not isinstance(model, vit_cls):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer: colln prunes the timm ViT family (vit_*, deit_*)"
        )
    if any(isinstance(m, PruningBlock) for m in model.modules()):
        raise UnsupportedModelError("this model is already pruned: call colln.prune on the original model")
    if model.dynamic_img_size:
        raise UnsupportedModelError(
            "dynamic_img_size=True is not supported: token counts must be static; create the model with a fixed img_size"
        )
    if model.global_pool == "" and output == "logits":
        raise UnsupportedModelError(
            "global_pool='' returns every token and pruning would change that output's shape; use a pooled head"
        )
    if metric in ("cls", "correct") and model.cls_token is None:
        raise UnsupportedModelError(f"metric {metric!r} needs a [CLS] token and this model has none; use metric 'colln'")
    _check_blocks(model, layers)


def _check_blocks(
    model: nn.Module,
    layers: Sequence[int],
) -> None:
    _, block_cls, attn_cls = _timm_classes()
    for i in layers:
        blk = model.blocks[i]
        if type(blk) is not block_cls:
            raise UnsupportedModelError(f"block {i} is a {type(blk).__name__}: only timm's pre-norm Block can prune")
        if type(blk.attn) is not attn_cls:
            raise UnsupportedModelError(f"block {i} uses {type(blk.attn).__name__}: only timm's Attention can prune")


def model_dims(
    model: nn.Module,
) -> ModelDims:
    """Per-token and per-image multiply-adds of the parts the keep plan changes."""

    def linear_macs(module: nn.Module) -> int:
        return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

    blk = model.blocks[0]
    proj = model.patch_embed.proj
    patch_macs = model.patch_embed.num_patches * proj.weight.numel() if isinstance(proj, nn.Conv2d) else 0
    head_macs = linear_macs(model.head) if isinstance(model.head, nn.Module) else 0
    return ModelDims(
        depth=len(model.blocks),
        attn_dim=blk.attn.num_heads * blk.attn.head_dim,
        attn_linear_macs=linear_macs(blk.attn),
        mlp_macs=linear_macs(blk.mlp),
        patch_macs=patch_macs,
        head_macs=head_macs,
    )


def plan_for(
    model: nn.Module,
    keep: float | Sequence[float] | PruneConfig = 0.7,
    **settings: object,
) -> KeepPlan:
    """The keep plan :func:`prune` would use for ``model`` with the same arguments (checks support first)."""
    config = PruneConfig.of(keep, **settings)
    check_supported(model, (), config.metric, config.output)
    num_prefix = model.num_prefix_tokens
    plan = make_plan(model.patch_embed.num_patches + num_prefix, num_prefix, model_dims(model), config)
    _check_blocks(model, [i for i, _ in plan.selection_layers])
    return plan


def prune(
    model: nn.Module,
    keep: float | Sequence[float] | PruneConfig = 0.7,
    **settings: object,
) -> nn.Module:
    """A pruned copy of a timm VisionTransformer; ``model`` is left untouched.

    ``keep`` is a rate, one rate per pruning layer, or a whole :class:`PruneConfig`; the other
    settings (``layers``, ``metric``, ``norm``, ``rescue``, ``fuse``, ``spatial_order``,
    ``round_to``; see :class:`PruneConfig`) are keyword-only. The plan is attached as
    ``pruned.colln_plan`` (see :func:`get_plan`). Layers whose keep count is every candidate (e.g.
    ``keep=1.0``) stay timm's own block, so ``keep=1.0`` is exactly the unpruned model.

    ``output="tokens"`` (with ``feature_layer``, ``merge``, ``order``) returns a :class:`TokenEncoder`
    whose forward gives ``(tokens, indices)`` instead of logits.
    """
    plan = plan_for(model, keep, **settings)
    pruned = copy.deepcopy(model)
    for layer, k in plan.selection_layers:
        wrapper = FeatureBlock if layer == plan.feature_block else PruningBlock
        pruned.blocks[layer] = wrapper(pruned.blocks[layer], layer=layer, num_prefix=plan.num_prefix, k=k, config=plan.config)
    if plan.feature_block is not None:
        return TokenEncoder(pruned, plan)
    pruned.colln_plan = plan
    return pruned


def get_plan(
    model: nn.Module,
) -> KeepPlan:
    plan = getattr(model, "colln_plan", None)
    if plan is None:
        raise UnsupportedModelError("this model was not made by colln.prune (no keep plan attached)")
    return plan


@contextlib.contextmanager
def explicit_attention(
    model: nn.Module,
) -> Iterator[None]:
    """Inside the context, timm's ``Attention`` modules take their own non-fused path (``q * scale @
    k^T``, softmax, ``@ v``) instead of fused SDPA, as the pruning blocks already do. For export:
    the ONNX exporter decomposes SDPA into reshapes around a transpose of ``k`` that ONNX Runtime
    cannot fold into the product, and colln's ONNX Runtime attention fusion
    (:mod:`colln.export.ort_graph`) matches the plain form."""
    _, _, attention = _timm_classes()
    modules = [m for m in model.modules() if isinstance(m, attention)]
    saved = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, fused in zip(modules, saved, strict=True):
            m.fused_attn = fused


@contextlib.contextmanager
def record_selections(
    model: nn.Module,
) -> Iterator[list[Selection]]:
    """Collect each pruning block's :class:`Selection` for the forwards run inside the context."""
    recorder: list[Selection] = []
    blocks = [m for m in model.modules() if isinstance(m, PruningBlock)]
    for blk in blocks:
        blk._recorder = recorder
    try:
        yield recorder
    finally:
        for blk in blocks:
            blk._recorder = None
