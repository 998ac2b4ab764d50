"""The only file that knows timm's ViT internals: wraps chosen blocks of a timm VisionTransformer so
they prune tokens between the attention residual and the MLP.

Module surgery rather than an fx/export trace: timm's VisionTransformer keeps its blocks in an
``nn.Sequential`` and token counts only change inside a block, so wrapping the block (and calling its
own submodules) is the whole rewrite; the graph exporters then see plain tensor ops with constant K.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
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
    sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_with_probs` plus the keys ``[B, N, H * head_dim]`` (after ``k_norm``; the
    merge compares tokens by them). ``sizes`` ``[B, N]``: ToMe's proportional attention, log(size)
    added to every query's logit of each key (a merged token counts as the patches it stands for)."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = ((q * attn.scale) @ k.transpose(-2, -1)).float()
    if sizes is not None:
        logits = logits + sizes.float().log()[:, None, None, :]
    probs = logits.softmax(dim=-1)
    out = attn.attn_drop(probs.to(v.dtype)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), probs, k.transpose(1, 2).reshape(b, n, -1)


@dataclass(frozen=True)
class Selection:
    """What one pruning block chose for a batch: candidate indices ``[B, k]``, scores ``[B, N_cand]``.

    A ToMe block records the A candidates it merged as ``indices`` ``[B, r]`` (into the non-prefix
    tokens of set A, see :func:`ops.bipartite_edges`) and every A candidate's best edge similarity
    as ``scores``. Merging blocks also record ``merge_margin`` ``[B]``: the smallest
    gap between a merged token's most similar destination and the next (see :func:`ops.merge_margin`)."""

    layer: int
    indices: torch.Tensor
    scores: torch.Tensor
    merge_margin: torch.Tensor | None = None


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
        x, probs, _ = _attend(self.block, x)
        x, indices, scores = ops.prune_tokens(x, probs, self.num_prefix, self.k, self.config)
        self._record(indices, scores)
        return _mlp(self.block, x), indices

    def _record(
        self,
        indices: torch.Tensor,
        scores: torch.Tensor,
        merge_margin: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        """``merge_margin`` is computed only while recording: the exported graph stays without it."""
        if self._recorder is not None:
            margin = merge_margin() if merge_margin is not None else None
            self._recorder.append(Selection(self.layer, indices, scores, margin))

    def extra_repr(self) -> str:
        c = self.config
        return f"layer={self.layer}, k={self.k}, metric={c.metric}, norm={c.norm}, fuse={c.fuse}"


def _attend(
    block: nn.Module,
    x: torch.Tensor,
    sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm ``Block``'s attention residual through its own submodules: ``(x, probs, keys)``."""
    attn_out, probs, keys = attention_parts(block.attn, block.norm1(x), sizes)
    return x + block.drop_path1(block.ls1(attn_out)), probs, keys


def _attend_sized(
    block: nn.Module,
    x: torch.Tensor,
    sizes: torch.Tensor | None,
    prop_attn: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_attend` in a merging block: proportional attention when asked and a merge came
    before (``sizes``), and the sizes returned (one patch per token before the first merge)."""
    x, probs, keys = _attend(block, x, sizes if prop_attn else None)
    return x, probs, keys, torch.ones_like(x[..., 0]) if sizes is None else sizes


def _mlp(
    block: nn.Module,
    x: torch.Tensor,
) -> torch.Tensor:
    """timm ``Block``'s MLP residual."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class SizedForward:
    """Blocks that take and return token sizes run through :class:`SizedBlocks` only: called alone
    (e.g. by timm's gradient checkpointing, which iterates the blocks itself) they would lose the
    sizes, so they refuse."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        raise UnsupportedModelError(
            "a merging block runs inside the merged model's block sequence (token sizes pass between blocks): "
            "call the model, and leave timm's gradient checkpointing off"
        )


class ProportionalBlock(SizedForward, nn.Module):
    """A timm ``Block`` after a merge: proportional attention (log size on the logits), no merging."""

    def __init__(
        self,
        block: nn.Module,
    ) -> None:
        super().__init__()
        self.block = block

    def forward_sized(
        self,
        x: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _mlp(self.block, _attend(self.block, x, sizes)[0]), sizes


class MergingBlock(SizedForward, PruningBlock):
    """Col-Ln + merge: keeps ``k`` candidates by the metric, as :class:`PruningBlock`, and each
    dropped one joins its most similar kept token (key cosine), averaged by ``config.weight``
    (``size``, or ``score`` x size). Token sizes come in and go out (:class:`SizedBlocks`)."""

    def forward_sized(
        self,
        x: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p, c = self.num_prefix, self.config
        x, probs, keys, sizes = _attend_sized(self.block, x, sizes, c.prop_attn)
        indices, scores = ops.choose(ops.head_mean(probs), p, self.k, c)
        weights = sizes[:, p:] * (scores if c.weight == "score" else 1.0)
        merged, merged_sizes = ops.merge_tokens(x[:, p:], keys[:, p:], indices, weights, sizes[:, p:])
        self._record(indices, scores, lambda: ops.merge_margin(keys[:, p:], indices))
        x = torch.cat([x[:, :p], merged], dim=1)
        return _mlp(self.block, x), torch.cat([sizes[:, :p], merged_sizes], dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merge_weight={self.config.weight}, prop_attn={self.config.prop_attn}"


class ToMeBlock(SizedForward, PruningBlock):
    """ToMe: merges ``r`` tokens after the attention residual by bipartite soft matching on the
    head-mean keys (:func:`ops.bipartite_merge`), size-weighted; ``k`` is the candidates left."""

    def __init__(
        self,
        block: nn.Module,
        layer: int,
        num_prefix: int,
        k: int,
        r: int,
        config: PruneConfig,
    ) -> None:
        super().__init__(block, layer=layer, num_prefix=num_prefix, k=k, config=config)
        self.r = r

    def forward_sized(
        self,
        x: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.num_prefix
        x, _, keys, sizes = _attend_sized(self.block, x, sizes, self.config.prop_attn)
        metric = ops.head_mean_keys(keys, self.block.attn.num_heads)
        x, sizes, merged, _ = ops.bipartite_merge(x, metric, sizes, self.r, p)
        if self._recorder is not None:
            best, _, second_gap = ops.bipartite_edges(metric, p)
            self._record(merged, best, lambda: second_gap.gather(-1, merged).amin(dim=-1))
        return _mlp(self.block, x), sizes

    def extra_repr(self) -> str:
        return f"layer={self.layer}, r={self.r}, prop_attn={self.config.prop_attn}"


class SizedBlocks(nn.Sequential):
    """timm's block sequence for a merged model: token sizes (``[B, N]``, patches per token) thread
    through the blocks that merge or attend proportionally; timm's own blocks run as they are."""

    def forward(
        self,
        x: torch.Tensor,
    ) -> torch.Tensor:
        sizes = None
        for blk in self:
            if isinstance(blk, SizedForward):
                x, sizes = blk.forward_sized(x, sizes)
            else:
                x = blk(x)
        return x


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
        p, c = self.num_prefix, self.config
        x, probs, keys = _attend(self.block, x)
        indices, scores = ops.select(ops.head_mean(probs), p, self.k, c)
        kept_ids = ids.gather(-1, indices)
        if c.order != "score":
            indices, kept_ids = ops.order_by_patch_id(indices, kept_ids)
        if c.merge:
            self._record(indices, scores, lambda: ops.merge_margin(keys[:, p:], indices))
            x = _mlp(self.block, x)
            weights = scores if c.weight == "score" else torch.ones_like(scores)
            return ops.merge_tokens(x[:, p:], keys[:, p:], indices, weights)[0], kept_ids
        self._record(indices, scores)
        return _mlp(self.block, ops.gather_tokens(x, indices, p)[:, p:]), kept_ids

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
    what: str = "prune",
) -> None:
    _, block_cls, attn_cls = _timm_classes()
    for i in layers:
        blk = model.blocks[i]
        if type(blk) is not block_cls:
            raise UnsupportedModelError(f"block {i} is a {type(blk).__name__}: only timm's pre-norm Block can {what}")
        if type(blk.attn) is not attn_cls:
            raise UnsupportedModelError(f"block {i} uses {type(blk.attn).__name__}: only timm's Attention can {what}")


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
    if plan.config.merges:
        _wrap_merging(pruned, plan)
        pruned.colln_plan = plan
        return pruned
    for layer, k in plan.selection_layers:
        wrapper = FeatureBlock if layer == plan.feature_block else PruningBlock
        pruned.blocks[layer] = wrapper(pruned.blocks[layer], layer=layer, num_prefix=plan.num_prefix, k=k, config=plan.config)
    if plan.feature_block is not None:
        return TokenEncoder(pruned, plan)
    pruned.colln_plan = plan
    return pruned


def tome(
    model: nn.Module,
    r: int | Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    prop_attn: bool = True,
) -> nn.Module:
    """A ToMe copy of a timm VisionTransformer (Bolya et al. 2023): ``r`` tokens merged at every
    block of ``layers`` (default all) by bipartite soft matching, or one r per layer; an r above
    half a block's candidates is clamped there (``colln_plan.merge_counts``). ``r=0`` everywhere is
    exactly the unpruned model. ``prop_attn``: proportional attention after the first merge."""
    return prune(model, PruneConfig(keep=1.0, tome=r if isinstance(r, int) else tuple(r), layers=layers, prop_attn=prop_attn))


def _wrap_merging(
    model: nn.Module,
    plan: KeepPlan,
) -> None:
    """Wrap the merging blocks of ``plan`` (and, with proportional attention, every block after the
    first merge) and thread token sizes through them; no merge at all leaves timm's blocks as they are."""
    c, p = plan.config, plan.num_prefix
    if plan.method == "tome":
        merges = {i: (k, r) for i, k, r in zip(plan.layers, plan.keep_counts, plan.merge_counts) if r > 0}
    else:
        merges = {i: (k, 0) for i, k in plan.pruned_layers}
    if not merges:
        return
    first = min(merges)
    wrapped = [i for i in range(plan.depth) if i in merges or (c.prop_attn and i > first)]
    _check_blocks(model, wrapped, "merge (its keys are compared, its logits take the sizes)")
    blocks = list(model.blocks)
    for i in wrapped:
        if i not in merges:
            blocks[i] = ProportionalBlock(blocks[i])
        elif plan.method == "tome":
            blocks[i] = ToMeBlock(blocks[i], layer=i, num_prefix=p, k=merges[i][0], r=merges[i][1], config=c)
        else:
            blocks[i] = MergingBlock(blocks[i], layer=i, num_prefix=p, k=merges[i][0], config=c)
    model.blocks = SizedBlocks(*blocks)


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
