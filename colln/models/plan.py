"""The keep plan: token counts and keep counts fixed at rewrite time (no timm import)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

from colln.errors import PlanError
from colln.models.config import DEFAULT_FEATURE_LAYER, PruneConfig


@dataclass(frozen=True)
class ModelDims:
    """What the FLOPs estimate needs to know of a ViT."""

    depth: int
    attn_dim: int
    attn_linear_macs: int  # per token: qkv + proj (+ gate)
    mlp_macs: int  # per token
    patch_macs: int  # per image
    head_macs: int  # per image
    # VLM towers with a k x k projector: the plan counts groups of ``group`` = k*k patches (the LM's
    # tokens) and the per-token dims above are per group; ``token_grid`` is the grid of the output
    # tokens (a tower's ``positions`` output is (row, col) on it), ``None`` for other models.
    group: int = 1
    token_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.token_grid is not None:
            object.__setattr__(self, "token_grid", tuple(self.token_grid))  # JSON gives a list


@dataclass(frozen=True)
class FlopsEstimate:
    """Multiply-adds x 2 of the full and the pruned model, per image."""

    full: int
    pruned: int

    @property
    def bound(self) -> float:
        """Best speedup the plan allows: full / pruned FLOPs."""
        return self.full / self.pruned

    def to_dict(self) -> dict[str, float]:
        return {"full": self.full, "pruned": self.pruned, "ratio": self.pruned / self.full, "bound": self.bound}


@dataclass(frozen=True)
class BlockOp:
    """What one block does to the tokens: ``prune`` (keep ``count`` candidates), ``merge`` (keep
    ``count``, merge the rest into them), ``tome`` (merge ``count`` = r by bipartite matching) or
    ``select`` (a tokens model's final pick of ``count`` patches at its feature block). Blocks
    without an operation pass the tokens through."""

    layer: int
    kind: str
    count: int

    def to_list(self) -> list[int | str]:
        """``[layer, kind, count]``, as a plan's JSON lists it."""
        return [self.layer, self.kind, self.count]


@dataclass(frozen=True)
class KeepPlan:
    """Immutable description of where and how much a ViT is pruned: its :class:`PruneConfig`
    resolved against one model.

    ``tokens_in[i]`` counts the tokens entering block ``i`` (prefix included); ``keep_counts[j]``,
    in every plan, is ``k`` at ``layers[j]``: the candidates that leave that block. Pruning keeps
    ``ceil(keep_rates[j] * (tokens_in - num_prefix))``, rounded up to a multiple of
    ``config.round_to`` and capped at the candidate count (the K of its top-k).

    A ToMe plan (``config.tome``) merges at every block of ``layers``: ``merge_counts[j]`` is the r
    merged there, the requested r clamped to half the candidates (ToMe's bipartite sets cannot
    merge more), so its ``keep_counts[j]`` is the candidates minus r (its TopKs rank edges: their
    K is r, see :attr:`selection_layers`). Col-Ln + merge (``config.merge``) has the counts of the
    pruning plan: the dropped tokens are merged, not gone.

    For ``output="tokens"`` only blocks ``0..feature_block`` run: ``layers`` are the inner pruning
    layers (all before ``feature_block``), and the final selection at ``feature_block`` keeps
    ``final_k = ceil(final_rate * num_patches)`` patch tokens (``tokens_out``). ``None`` for logits.

    ``operations`` is what the model does, block by block (see :class:`BlockOp`): the rewrite, the
    FLOPs, validation and the report go by it; the per-layer views below are filters of it.
    """

    config: PruneConfig
    num_tokens: int
    num_prefix: int
    depth: int
    layers: tuple[int, ...]
    keep_rates: tuple[float, ...]
    keep_counts: tuple[int, ...]
    tokens_in: tuple[int, ...]
    tokens_out: int
    dims: ModelDims
    operations: tuple[BlockOp, ...]
    feature_block: int | None = None
    final_rate: float | None = None
    final_k: int | None = None
    merge_counts: tuple[int, ...] = ()

    @property
    def method(self) -> str:
        """``prune``, ``merge`` (Col-Ln + merge inside the encoder) or ``tome``."""
        return "tome" if self.config.tome is not None else "merge" if self.config.merges else "prune"

    @property
    def requested_r(self) -> tuple[int, ...]:
        """ToMe: the r asked for at each of ``layers`` (``merge_counts`` after clamping)."""
        tome = self.config.tome
        return () if tome is None else tome if isinstance(tome, tuple) else (tome,) * len(self.layers)

    def _counts(
        self,
        *kinds: str,
    ) -> tuple[tuple[int, int], ...]:
        """``(layer, count)`` of the operations of ``kinds``, in block order."""
        return tuple((op.layer, op.count) for op in self.operations if op.kind in kinds)

    @property
    def merge_layers(self) -> tuple[tuple[int, int], ...]:
        """``(layer, n)`` of the layers that merge: ToMe's r, or Col-Ln + merge's k."""
        return self._counts("merge", "tome")

    @property
    def kept_index_layers(self) -> tuple[tuple[int, int], ...]:
        """``(layer, k)`` of the layers whose graph TopKs give the kept candidates (validation reads
        them): prune and merge; not ToMe, whose TopKs rank edges, nor select, whose pick is the
        tokens model's ``indices`` output."""
        return self._counts("prune", "merge")

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix

    @property
    def blocks_run(self) -> int:
        """Blocks the pruned model runs: all of them, or up to the feature block for tokens."""
        return self.depth if self.feature_block is None else self.feature_block + 1

    def lm_prefill_flops_saved(
        self,
        lm_params: float,
    ) -> float:
        """A language model's prefill FLOPs saved per image by feeding it ``final_k`` instead of all
        patch tokens: ``2 * params * (N - K)`` (tokens output only)."""
        return 2.0 * lm_params * (self.num_patches - self.final_k)

    def k_at(self, layer: int) -> int:
        return self.keep_counts[self.layers.index(layer)]

    def tokens_after(self, layer: int) -> int:
        """Tokens leaving block ``layer`` (the input of the next block)."""
        return self.tokens_in[layer + 1] if layer + 1 < self.blocks_run else self.tokens_out

    @property
    def pruned_layers(self) -> tuple[tuple[int, int], ...]:
        """``(layer, k)`` of the encoder layers that really drop candidates (``k`` below the candidate
        count; ToMe's ``k`` is what its r merges leave): every operation but the final select."""
        return tuple((op.layer, self.k_at(op.layer)) for op in self.operations if op.kind != "select")

    @property
    def selection_layers(self) -> tuple[tuple[int, int], ...]:
        """``(layer, n)`` of every selection the model makes, ``n`` the K of its TopK: the k kept
        (prune, merge, a tokens model's final select) or ToMe's r merged edges."""
        return self._counts("prune", "merge", "tome", "select")

    @property
    def token_steps(self) -> str:
        """Tokens entering the first block, then after each pruning layer: ``197 -> 139 -> 98 -> 69``."""
        final = () if self.final_k is None else (self.final_k,)
        return " -> ".join(str(n) for n in (self.tokens_in[0], *(self.tokens_after(i) for i in self.layers), *final))

    def flops(self) -> FlopsEstimate:
        """For tokens the unpruned counterpart is the encoder cut at the feature block (no head):
        the final selection saves the feature block's MLP on the dropped tokens (not with merge,
        which needs every token's features)."""
        d = self.dims
        head = d.head_macs if self.feature_block is None else 0
        full = d.patch_macs + head + self.blocks_run * _block_macs(self.num_tokens, self.num_tokens, d)
        pruned = d.patch_macs + head
        ops = {op.layer: op for op in self.operations}
        n = self.num_tokens
        for i in range(self.blocks_run):
            n_out = self._tokens_left(ops[i], n) if i in ops else n
            pruned += _block_macs(n, n_out, d)
            n = n_out
        return FlopsEstimate(full=2 * full, pruned=2 * pruned)

    def _tokens_left(
        self,
        op: BlockOp,
        n: int,
    ) -> int:
        """Tokens a block with ``op`` leaves of the ``n`` entering it, which its MLP runs on (the steps
        select before the MLP); a select that merges needs every token's features first."""
        if op.kind == "tome":
            return n - op.count
        if op.kind == "select":
            return n if self.config.merge else op.count
        return self.num_prefix + op.count + (1 if self.config.fuse else 0)

    def to_dict(self) -> dict:
        """Flat JSON: the config's settings (``layers`` and ``keep_rates`` resolved), the counts, the
        operations (``[layer, kind, count]``), the FLOPs, the pruning layers and the token steps."""
        settings = {k: v for k, v in self.config.to_dict().items() if k not in ("keep", "layers")}
        return {
            **settings,
            "num_tokens": self.num_tokens,
            "num_prefix": self.num_prefix,
            "depth": self.depth,
            "layers": list(self.layers),
            "keep_rates": list(self.keep_rates),
            "keep_counts": list(self.keep_counts),
            "tokens_in": list(self.tokens_in),
            "tokens_out": self.tokens_out,
            "feature_block": self.feature_block,
            "final_rate": self.final_rate,
            "final_k": self.final_k,
            "dims": asdict(self.dims),
            "merge_counts": list(self.merge_counts),
            "operations": [op.to_list() for op in self.operations],
            "pruned_layers": [list(p) for p in self.pruned_layers],
            "token_steps": self.token_steps,
            "flops": self.flops().to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> KeepPlan:
        rates = tuple(data["keep_rates"])
        final = data.get("final_rate")
        every = rates + (() if final is None else (final,))
        # A ToMe plan's keep rates describe what its merges left; its config keeps 1.0.
        keep = 1.0 if data.get("tome") is not None else every[0] if len(set(every)) == 1 else every
        config = PruneConfig.from_dict({**data, "keep": keep})
        ops = data.get("operations")
        return cls(
            config=replace(config, layers=tuple(data["layers"])),
            num_tokens=data["num_tokens"],
            num_prefix=data["num_prefix"],
            depth=data["depth"],
            layers=tuple(data["layers"]),
            keep_rates=rates,
            keep_counts=tuple(data["keep_counts"]),
            tokens_in=tuple(data["tokens_in"]),
            tokens_out=data["tokens_out"],
            dims=ModelDims(**data["dims"]),
            operations=_listed_operations(data, config) if ops is None else tuple(BlockOp(*op) for op in ops),
            feature_block=data.get("feature_block"),
            final_rate=final,
            final_k=data.get("final_k"),
            merge_counts=tuple(data.get("merge_counts", ())),
        )

    def __str__(self) -> str:
        f = self.flops()
        bound = f"FLOPs {f.pruned / 1e9:.3g}G of {f.full / 1e9:.3g}G, bound {f.bound:.2f}x"
        if self.method == "tome":
            merges = [
                f"block {i}: r={r}" + (f" (clamped from {asked})" if r != asked else "")
                for i, r, asked in zip(self.layers, self.merge_counts, self.requested_r)
                if asked
            ]
            return (
                f"KeepPlan(tome, tokens {self.token_steps}; {', '.join(merges) or 'no merging'}; "
                f"prop_attn={self.config.prop_attn}; {bound})"
            )
        where = ", ".join(f"block {i}: k={k}" for i, k in zip(self.layers, self.keep_counts)) or "no pruning"
        if self.config.merges:
            where += f"; merged into the kept tokens by {self.config.weight}, prop_attn={self.config.prop_attn}"
        if self.feature_block is not None:
            where += f"; tokens of block {self.feature_block}: {self.final_k} of {self.num_patches} patches"
        return f"KeepPlan({self.config.metric}, tokens {self.token_steps}; {where}; fuse={self.config.fuse}; {bound})"


def _listed_operations(
    data: dict,
    config: PruneConfig,
) -> tuple[BlockOp, ...]:
    """The operations of a plan JSON written before plans listed them (export.json of older
    exports), from its counts: the blocks that change the tokens, as the plan builders list them."""
    p = data["num_prefix"]
    if config.tome is not None:
        ops = [BlockOp(i, "tome", r) for i, r in zip(data["layers"], data["merge_counts"]) if r > 0]
    else:
        kind = "merge" if config.merges else "prune"
        ops = [BlockOp(i, kind, k) for i, k in zip(data["layers"], data["keep_counts"]) if k < data["tokens_in"][i] - p]
    final = data.get("final_k")
    if data.get("feature_block") is not None and final < data["num_tokens"] - p:
        ops.append(BlockOp(data["feature_block"], "select", final))
    return tuple(ops)


def _block_macs(
    n_in: int,
    n_out: int,
    d: ModelDims,
) -> int:
    """Attention runs on the tokens entering the block, the MLP on those that leave it."""
    return n_in * d.attn_linear_macs + 2 * n_in * n_in * d.attn_dim + n_out * d.mlp_macs


def default_layers(depth: int) -> tuple[int, ...]:
    """EViT's blocks 3, 6, 9 of 12, scaled to ``depth``: the quarter points."""
    layers = sorted({round(depth * q / 4) for q in (1, 2, 3)})
    return tuple(i for i in layers if 0 <= i < depth)


def make_plan(
    num_tokens: int,
    num_prefix: int,
    dims: ModelDims,
    config: PruneConfig,
) -> KeepPlan:
    """Resolve ``config`` against a model's token count and dims. Raises :class:`PlanError` on
    layers the model does not have."""
    depth = dims.depth
    if config.output == "tokens":
        return _tokens_plan(num_tokens, num_prefix, dims, config)
    if config.tome is not None:
        return _tome_plan(num_tokens, num_prefix, dims, config)
    layers = default_layers(depth) if config.layers is None else config.layers
    rates = config.rates(len(layers))
    _check_layers(layers, depth, num_tokens, num_prefix)
    tokens_in, counts, ops, n = _prune_counts(num_tokens, num_prefix, depth, layers, rates, config)
    return KeepPlan(
        config=config,
        num_tokens=num_tokens,
        num_prefix=num_prefix,
        depth=depth,
        layers=tuple(layers),
        keep_rates=rates,
        keep_counts=tuple(counts),
        tokens_in=tuple(tokens_in),
        tokens_out=n,
        dims=dims,
        operations=tuple(ops),
    )


def resolve_feature_layer(
    feature_layer: int | None,
    depth: int,
) -> int:
    """The feature block's index: negative counts from the end (-1: last block; ``None``: -2), as
    timm's ``forward_intermediates`` and LLaVA's ``mm_vision_select_layer`` do."""
    layer = DEFAULT_FEATURE_LAYER if feature_layer is None else feature_layer
    if not -depth <= layer < depth:
        raise PlanError(f"feature layer {layer} is out of range: this model has blocks 0..{depth - 1} (or -1..-{depth})")
    return layer % depth


def _tokens_plan(
    num_tokens: int,
    num_prefix: int,
    dims: ModelDims,
    config: PruneConfig,
) -> KeepPlan:
    feature = resolve_feature_layer(config.feature_layer, dims.depth)
    layers = () if config.layers is None else config.layers
    _check_layers(layers, dims.depth, num_tokens, num_prefix)
    late = [i for i in layers if i >= feature]
    if late:
        raise PlanError(
            f"pruning layer {late[0]} is at or after the feature layer (block {feature}): inner pruning layers must precede it"
        )
    *rates, final_rate = config.rates(len(layers) + 1)
    tokens_in, counts, ops, n = _prune_counts(num_tokens, num_prefix, feature + 1, layers, tuple(rates), config)
    patches = num_tokens - num_prefix
    final_k = _keep_count(final_rate, patches, config.round_to)
    if final_k > n - num_prefix:
        raise PlanError(
            f"the final selection keeps {final_k} of {patches} patches but only {n - num_prefix} survive the inner pruning: "
            "lower the final keep rate (the last of --keep) or prune less inside"
        )
    # Keeping every patch selects nothing: the feature block passes its tokens through.
    select = [BlockOp(feature, "select", final_k)] if final_k < patches else []
    return KeepPlan(
        config=config,
        num_tokens=num_tokens,
        num_prefix=num_prefix,
        depth=dims.depth,
        layers=tuple(layers),
        keep_rates=tuple(rates),
        keep_counts=tuple(counts),
        tokens_in=tuple(tokens_in),
        tokens_out=final_k,
        dims=dims,
        operations=(*ops, *select),
        feature_block=feature,
        final_rate=final_rate,
        final_k=final_k,
    )


def _tome_plan(
    num_tokens: int,
    num_prefix: int,
    dims: ModelDims,
    config: PruneConfig,
) -> KeepPlan:
    layers = tuple(range(dims.depth)) if config.layers is None else config.layers
    _check_layers(layers, dims.depth, num_tokens, num_prefix)
    asked = config.tome if isinstance(config.tome, tuple) else (config.tome,) * len(layers)
    if len(asked) != len(layers):
        raise PlanError(f"{len(asked)} ToMe r values for {len(layers)} merging blocks: give one r, or one per block")
    tokens_in, counts, merged, ops = [], [], [], []
    n = num_tokens
    for i in range(dims.depth):
        tokens_in.append(n)
        if i in layers:
            cand = n - num_prefix
            # Bipartite sets of ceil and floor half the candidates: at most the smaller can merge.
            r = min(asked[layers.index(i)], cand // 2)
            merged.append(r)
            counts.append(cand - r)
            ops += [BlockOp(i, "tome", r)] if r else []
            n -= r
    return KeepPlan(
        config=config,
        num_tokens=num_tokens,
        num_prefix=num_prefix,
        depth=dims.depth,
        layers=tuple(layers),
        keep_rates=tuple(k / (k + r) for k, r in zip(counts, merged)),
        keep_counts=tuple(counts),
        tokens_in=tuple(tokens_in),
        tokens_out=n,
        dims=dims,
        operations=tuple(ops),
        merge_counts=tuple(merged),
    )


def _keep_count(
    rate: float,
    candidates: int,
    round_to: int,
) -> int:
    # round() first: 0.7 * 130 is 91.00000000000001 in floats, and ceil would give 92.
    k = math.ceil(round(rate * candidates, 9))
    return min(candidates, max(1, math.ceil(k / round_to) * round_to))


def _check_layers(
    layers: tuple[int, ...],
    depth: int,
    num_tokens: int,
    num_prefix: int,
) -> None:
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise PlanError(f"layer {bad[0]} is out of range: this model has blocks 0..{depth - 1}")
    if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
        raise PlanError(f"layers {list(layers)} must be strictly increasing block indices")
    if num_tokens - num_prefix < 1:
        raise PlanError(f"the model has no patch tokens to prune ({num_tokens} tokens, {num_prefix} prefix)")


def _prune_counts(
    num_tokens: int,
    num_prefix: int,
    blocks: int,
    layers: tuple[int, ...],
    rates: tuple[float, ...],
    config: PruneConfig,
) -> tuple[list[int], list[int], list[BlockOp], int]:
    """Tokens entering each of the first ``blocks`` blocks, k per pruning layer, the operations of
    the layers that drop candidates (k below their count: the others pass the tokens through),
    tokens leaving."""
    tokens_in: list[int] = []
    counts: list[int] = []
    ops: list[BlockOp] = []
    kind = "merge" if config.merges else "prune"
    n = num_tokens
    for i in range(blocks):
        tokens_in.append(n)
        if i in layers:
            cand = n - num_prefix
            k = _keep_count(rates[layers.index(i)], cand, config.round_to)
            counts.append(k)
            if k < cand:
                ops.append(BlockOp(i, kind, k))
            n = num_prefix + k + (1 if config.fuse and k < cand else 0)
    return tokens_in, counts, ops, n
