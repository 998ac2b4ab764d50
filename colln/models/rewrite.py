"""The rewrite: wraps the chosen blocks of a timm model so they prune or merge tokens between the
attention residual and the MLP, and threads what follows the tokens through the blocks.

Module surgery rather than an fx/export trace: token counts only change inside a block, so wrapping
the block (and calling its own submodules through its family's adapter, :mod:`colln.models.adapters`)
is the whole rewrite; the graph exporters then see plain tensor ops with constant K. What follows
the tokens from block to block is a :class:`TokenState`: the tokens, their rotary positions (RoPE
families: each kept token keeps its own rows of the table), their sizes (merging) and their patch
ids (tokens and dense outputs). timm's ``VisionTransformer`` with logits output stays a
``VisionTransformer`` (its forward threads tokens through one ``nn.Sequential``); every other family
and output runs in a :class:`ReducedViT`, which calls the model's own embedding and head.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from colln.errors import UnsupportedModelError
from colln.models import ops
from colln.models.adapters import SUPPORTED_TIMM, Positions, Probe, block_adapter, model_adapter
from colln.models.config import PruneConfig
from colln.models.plan import KeepPlan, make_plan

__all__ = ["SUPPORTED_TIMM", "explicit_attention", "get_plan", "plan_for", "prune", "record_selections", "tome"]


@dataclass(frozen=True)
class TokenState:
    """What passes from block to block: tokens ``x`` ``[B, N, C]`` (prefix first), their rotary
    ``positions`` (patch tokens only), ``sizes`` ``[B, N]`` (patches each token stands for, once a
    merge happened), ``ids`` ``[B, N - prefix]`` (each candidate's patch id, for tokens and dense
    outputs) and ``dropped`` (dense output: ``(features, ids)`` of the tokens dropped so far)."""

    x: torch.Tensor
    positions: Positions | None = None
    sizes: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    dropped: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def rope(self, block: int) -> torch.Tensor | None:
        return None if self.positions is None else self.positions.at(block)

    def bias(self, prop_attn: bool) -> torch.Tensor | None:
        """ToMe's proportional attention: log(size) on every query's logit of each key."""
        return None if self.sizes is None or not prop_attn else self.sizes.float().log()[:, None, None, :]

    def after(
        self,
        x: torch.Tensor,
        order: torch.Tensor,
        before: torch.Tensor,
        num_prefix: int,
        sizes: torch.Tensor | None = None,
    ) -> TokenState:
        """The state after a selection: ``order`` ``[B, k]`` are the candidates (of ``before``, the
        tokens the selection chose from) that continue, in their new order; positions and ids follow
        them, and with ids the others are kept as dropped features."""
        ids, dropped = self.ids, self.dropped
        if ids is not None:
            dropped = (*dropped, ops.dropped(before[:, num_prefix:], ids, order))
            ids = ids.gather(-1, order)
        positions = None if self.positions is None else self.positions.follow(order)
        return TokenState(x, positions, sizes if sizes is not None else self.sizes, ids, dropped)


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
    """A block that keeps ``k`` candidate tokens after its attention residual (Col-Ln, [CLS] or the
    rescue selection; EViT's fused token with ``config.fuse``)."""

    def __init__(
        self,
        block: nn.Module,
        layer: int,
        num_prefix: int,
        k: int,
        config: PruneConfig,
        group: int = 1,
    ) -> None:
        super().__init__()
        self.block = block
        self.layer = layer
        self.num_prefix = num_prefix
        self.k = k
        self.config = config
        # A VLM tower's projector groups (patches per group): k, picks and scores are of groups.
        self.group = group
        self._probe = Probe(block_adapter(block, layer), block)
        self._recorder: list[Selection] | None = None

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise UnsupportedModelError("attention masks are not supported in pruned blocks (token counts change)")
        return self.step(TokenState(x)).x

    def step(
        self,
        state: TokenState,
    ) -> TokenState:
        p = self.num_prefix
        att = self._probe.attend(self.block, state.x, state.rope(self.layer), state.bias(self.config.prop_attn))
        x, indices, scores = ops.prune_tokens(att.x, att.probs, p, self.k, self.config, self.group)
        self._record(indices, scores)
        return state.after(self._mlp(x), ops.group_members(indices, self.group), att.x, p)

    def _mlp(
        self,
        x: torch.Tensor,
    ) -> torch.Tensor:
        return self._probe.adapter.mlp(self.block, x)

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


class SizedForward:
    """Blocks that take and return token sizes run through :class:`ThreadedBlocks` only: called alone
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


class MergingBlock(SizedForward, PruningBlock):
    """Col-Ln + merge: keeps ``k`` candidates by the metric, as :class:`PruningBlock`, and each
    dropped one joins its most similar kept token (key cosine), averaged by ``config.weight``
    (``size``, or ``score`` x size). A merged token keeps the position of the token it joins."""

    def step(
        self,
        state: TokenState,
    ) -> TokenState:
        p, c = self.num_prefix, self.config
        att = self._probe.attend(self.block, state.x, state.rope(self.layer), state.bias(c.prop_attn))
        sizes = torch.ones_like(att.x[..., 0]) if state.sizes is None else state.sizes
        indices, scores = ops.select_in_order(ops.head_mean(att.probs), p, self.k, c)
        weights = sizes[:, p:] * (scores if c.weight == "score" else 1.0)
        merged, merged_sizes = ops.merge_tokens(att.x[:, p:], att.keys[:, p:], indices, weights, sizes[:, p:])
        self._record(indices, scores, lambda: ops.merge_margin(att.keys[:, p:], indices))
        x = self._mlp(torch.cat([att.x[:, :p], merged], dim=1))
        return state.after(x, indices, att.x, p, sizes=torch.cat([sizes[:, :p], merged_sizes], dim=1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merge_weight={self.config.weight}, prop_attn={self.config.prop_attn}"


class ToMeBlock(SizedForward, PruningBlock):
    """ToMe: merges ``r`` tokens after the attention residual by bipartite soft matching on the
    head-mean keys (:func:`ops.bipartite_merge`), size-weighted; ``k``, as in every pruning block,
    is the candidates that leave the block (those the ``r`` merges leave)."""

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

    def step(
        self,
        state: TokenState,
    ) -> TokenState:
        p = self.num_prefix
        att = self._probe.attend(self.block, state.x, state.rope(self.layer), state.bias(self.config.prop_attn))
        sizes = torch.ones_like(att.x[..., 0]) if state.sizes is None else state.sizes
        mean_keys = ops.head_mean_keys(att.keys, att.key_heads)
        x, sizes, merged, order = ops.bipartite_merge(att.x, mean_keys, sizes, self.r, p)
        if self._recorder is not None:
            best, _, second_gap = ops.bipartite_edges(mean_keys, p)
            self._record(merged, best, lambda: second_gap.gather(-1, merged).amin(dim=-1))
        return state.after(self._mlp(x), order, att.x, p, sizes=sizes)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, r={self.r}, prop_attn={self.config.prop_attn}"


class FeatureBlock(PruningBlock):
    """The feature block of a tokens model: picks ``k`` patch tokens by the metric on its own
    attention and leaves the block's output at them (prefix dropped) with their patch ids.

    Without merge the MLP runs on the kept tokens only (it is per token, so their rows equal the
    full block's); merge needs every token's output."""

    def step(  # type: ignore[override]
        self,
        state: TokenState,
    ) -> TokenState:
        p, c = self.num_prefix, self.config
        att = self._probe.attend(self.block, state.x, state.rope(self.layer), None)
        g = self.group
        indices, scores = ops.select_by_score(ops.head_mean(att.probs), p, self.k, c, g)
        # A group's place is its first patch's.
        kept_ids = state.ids.gather(-1, indices * g if g > 1 else indices)
        if c.order != "score":
            indices, kept_ids = ops.order_by_patch_id(indices, kept_ids)
        if c.merge:
            self._record(indices, scores, lambda: ops.merge_margin(att.keys[:, p:], indices))
            x = self._mlp(att.x)
            weights = scores if c.weight == "score" else torch.ones_like(scores)
            return TokenState(ops.merge_tokens(x[:, p:], att.keys[:, p:], indices, weights)[0], ids=kept_ids)
        self._record(indices, scores)
        members = ops.group_members(indices, g)
        ids = kept_ids if g == 1 else state.ids.gather(-1, members)
        return TokenState(self._mlp(ops.gather_tokens(att.x, members, p)[:, p:]), ids=ids)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merge={self.config.merge}, order={self.config.order or 'spatial'}"


class ThreadedBlocks(nn.Sequential):
    """A model's block sequence run on a :class:`TokenState`: colln's blocks step the state, the
    model's own blocks run through their adapter with the state's positions and (after a merge,
    with proportional attention) the log-size bias."""

    def __init__(self, *blocks: nn.Module, prop_attn: bool = False) -> None:
        super().__init__(*blocks)
        self.prop_attn = prop_attn

    def run(
        self,
        state: TokenState,
    ) -> TokenState:
        for i, blk in enumerate(self):
            if isinstance(blk, PruningBlock):
                state = blk.step(state)
            else:
                x = block_adapter(blk, i).forward(blk, state.x, state.rope(i), state.bias(self.prop_attn))
                state = replace(state, x=x)
        return state

    def forward(
        self,
        x: torch.Tensor,
    ) -> torch.Tensor:
        return self.run(TokenState(x)).x


class ReducedViT(nn.Module):
    """A token-reduced model of any family colln runs: the model's own embedding (tokens and rotary
    positions), the blocks as a :class:`ThreadedBlocks`, then by ``plan.config.output``:

    - ``logits``: the model's own norm and head;
    - ``tokens`` (vision towers of VLMs): ``(tokens [B, K, C], indices [B, K])``, the feature
      block's output at the kept patch tokens (no final norm, no prefix) and their patch ids,
      row-major over the patch grid;
    - ``dense``: ``[B, num_patches, C]`` on the full patch grid, normed like the model's features:
      each patch has its final features if it was kept to the end, else the features it had when
      its block dropped it (gathered back by patch id: no Scatter)."""

    def __init__(
        self,
        vit: nn.Module,
        plan: KeepPlan,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.adapter = model_adapter(vit)
        self.num_prefix = plan.num_prefix
        self.num_patches = plan.num_patches
        self.output = plan.config.output
        self.selects = any(op.kind == "select" for op in plan.operations)
        # timm's data config (input size, mean/std) reads it: preprocessing stays the model's own.
        self.pretrained_cfg = getattr(vit, "pretrained_cfg", {})
        self.colln_plan = plan

    @property
    def num_classes(self) -> int | None:
        """The wrapped model's head size (timm's attribute, which the data checks read)."""
        return getattr(self.vit, "num_classes", None)

    def forward(
        self,
        images: torch.Tensor,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x, positions = self.adapter.embed(self.vit, images)
        ids = None
        p = self.num_prefix
        if self.output != "logits":
            # Each patch token's place in the embedding's order (a tower's groups count as one patch each in the plan).
            ids = torch.arange(x.shape[1] - p, device=x.device).unsqueeze(0).expand(x.shape[0], -1)
        state = self.adapter.blocks(self.vit).run(TokenState(x, positions, ids=ids))
        if self.output == "tokens":
            # A final selection (FeatureBlock) leaves only the kept tokens; keep 1.0 leaves every token.
            x = state.x if self.selects else state.x[:, p:]
            return self.adapter.tokens(self.vit, x, state.ids)
        if self.output == "dense":
            feats = torch.cat([*(f for f, _ in state.dropped), state.x[:, p:]], dim=1)
            ids = torch.cat([*(i for _, i in state.dropped), state.ids], dim=1)
            return ops.gather_tokens(self.adapter.features(self.vit, feats), ops.order_by_id(ids), 0)
        return self.adapter.head(self.vit, self.adapter.features(self.vit, state.x))


def check_supported(
    model: nn.Module,
    config: PruneConfig,
) -> None:
    """Refuse, in one line, what the rewrite does not support (blocks are checked by :func:`prune`)."""
    adapter = model_adapter(model)
    if any(isinstance(m, (PruningBlock, ReducedViT)) for m in model.modules()):
        raise UnsupportedModelError("this model is already pruned: call colln.prune on the original model")
    adapter.check(model, config)
    if config.metric in ("cls", "correct") and not adapter.has_cls(model):
        raise UnsupportedModelError(f"metric {config.metric!r} needs a [CLS] token and this model has none; use metric 'colln'")
    if config.fuse and (adapter.has_positions(model) or config.output == "dense"):
        raise UnsupportedModelError(
            "--fuse adds a token that is no patch (it has no position or patch id), which RoPE models and "
            "--output dense need for every token: use --merge to keep the pruned tokens' content"
        )


def plan_for(
    model: nn.Module,
    keep: float | Sequence[float] | PruneConfig = 0.7,
    **settings: object,
) -> KeepPlan:
    """The keep plan :func:`prune` would use for ``model`` with the same arguments (checks support first)."""
    config = PruneConfig.of(keep, **settings)
    check_supported(model, config)
    adapter = model_adapter(model)
    if config.output == "tokens" and config.feature_layer is None and adapter.feature_layer is not None:
        config = replace(config, feature_layer=adapter.feature_layer)
    num_prefix = adapter.num_prefix(model)
    grid = adapter.grid(model)
    plan = make_plan(grid[0] * grid[1] + num_prefix, num_prefix, adapter.dims(model), config)
    blocks = adapter.blocks(model)
    for i in _adapted_blocks(plan, in_place=_in_place(model, config)):
        block_adapter(blocks[i], i)
    return plan


def _in_place(model: nn.Module, config: PruneConfig) -> bool:
    """timm's VisionTransformer with logits output stays itself: its forward threads tokens through
    one Sequential and it has no positions to carry."""
    return model_adapter(model).in_place_logits and config.output == "logits"


def _adapted_blocks(
    plan: KeepPlan,
    in_place: bool,
) -> list[int]:
    """Blocks colln runs through their adapter: the selecting blocks, and every block when colln
    runs the model (or when proportional attention follows a merge)."""
    selecting = [op.layer for op in plan.operations]
    if not in_place:
        return list(range(plan.blocks_run))
    if plan.config.merges and selecting and plan.config.prop_attn:
        return sorted(set(selecting) | set(range(min(selecting), plan.depth)))
    return selecting


def prune(
    model: nn.Module,
    keep: float | Sequence[float] | PruneConfig = 0.7,
    **settings: object,
) -> nn.Module:
    """A pruned copy of a timm model; ``model`` is left untouched.

    ``keep`` is a rate, one rate per pruning layer, or a whole :class:`PruneConfig`; the other
    settings (``layers``, ``metric``, ``norm``, ``rescue``, ``fuse``, ``spatial_order``,
    ``round_to``; see :class:`PruneConfig`) are keyword-only. The plan is attached as
    ``pruned.colln_plan`` (see :func:`get_plan`). Layers whose keep count is every candidate (e.g.
    ``keep=1.0``) stay the model's own block, so ``keep=1.0`` is exactly the unpruned model.

    timm's ``VisionTransformer`` with logits output stays a ``VisionTransformer``; other families
    and outputs come back as a :class:`ReducedViT` (``output="tokens"``: ``(tokens, indices)``;
    ``output="dense"``: features on the full patch grid).
    """
    plan = plan_for(model, keep, **settings)
    in_place = _in_place(model, plan.config)
    pruned = copy.deepcopy(model)
    adapter = model_adapter(pruned)
    blocks = list(adapter.blocks(pruned))[: plan.blocks_run]
    c, p = plan.config, plan.num_prefix
    step = {"prune": PruningBlock, "merge": MergingBlock, "select": FeatureBlock}
    for op in plan.operations:
        blk = blocks[op.layer]
        if op.kind == "tome":
            blocks[op.layer] = ToMeBlock(blk, layer=op.layer, num_prefix=p, k=plan.k_at(op.layer), r=op.count, config=c)
        else:
            blocks[op.layer] = step[op.kind](blk, layer=op.layer, num_prefix=p, k=op.count, config=c, group=plan.dims.group)
    if in_place and not c.merges:
        adapter.set_blocks(pruned, nn.Sequential(*blocks))
    else:
        adapter.set_blocks(pruned, ThreadedBlocks(*blocks, prop_attn=c.merges and c.prop_attn))
    if in_place:
        pruned.colln_plan = plan
        return pruned
    if c.output != "logits":
        adapter.drop_head(pruned, keep_norm=c.output == "dense")
    return ReducedViT(pruned, plan)


def tome(
    model: nn.Module,
    r: int | Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    prop_attn: bool = True,
) -> nn.Module:
    """A ToMe copy of a timm model (Bolya et al. 2023): ``r`` tokens merged at every block of
    ``layers`` (default all) by bipartite soft matching, or one r per layer; an r above half a
    block's candidates is clamped there (``colln_plan.merge_counts``). ``r=0`` everywhere is exactly
    the unpruned model. ``prop_attn``: proportional attention after the first merge."""
    return prune(model, PruneConfig(keep=1.0, tome=r if isinstance(r, int) else tuple(r), layers=layers, prop_attn=prop_attn))


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
    """Inside the context, every attention module with timm's ``fused_attn`` switch takes its own
    non-fused path (``q * scale @ k^T``, softmax, ``@ v``) instead of fused SDPA, as the pruning
    blocks already do. For export: the ONNX exporter decomposes SDPA into reshapes around a transpose
    of ``k`` that ONNX Runtime cannot fold into the product, and colln's ONNX Runtime attention
    fusion (:mod:`colln.export.ort_graph`) matches the plain form."""
    modules = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
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
