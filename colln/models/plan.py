"""The keep plan: token counts and keep counts fixed at rewrite time (no timm import)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

from colln.errors import PlanError
from colln.models.config import PruneConfig


@dataclass(frozen=True)
class ModelDims:
    """What the FLOPs estimate needs to know of a ViT."""

    depth: int
    attn_dim: int
    attn_linear_macs: int  # per token: qkv + proj (+ gate)
    mlp_macs: int  # per token
    patch_macs: int  # per image
    head_macs: int  # per image


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
class KeepPlan:
    """Immutable description of where and how much a ViT is pruned: its :class:`PruneConfig`
    resolved against one model.

    ``tokens_in[i]`` counts the tokens entering block ``i`` (prefix included); ``keep_counts[j]``
    is ``k`` at ``layers[j]``: ``ceil(keep_rates[j] * (tokens_in - num_prefix))``, rounded up to a
    multiple of ``config.round_to`` and capped at the candidate count.
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

    def k_at(self, layer: int) -> int:
        return self.keep_counts[self.layers.index(layer)]

    def tokens_after(self, layer: int) -> int:
        """Tokens leaving block ``layer`` (the input of the next block)."""
        return self.tokens_in[layer + 1] if layer + 1 < self.depth else self.tokens_out

    @property
    def pruned_layers(self) -> tuple[tuple[int, int], ...]:
        """``(layer, k)`` of the layers that really prune (``k`` below the candidate count)."""
        return tuple((i, k) for i, k in zip(self.layers, self.keep_counts) if k < self.tokens_in[i] - self.num_prefix)

    @property
    def token_steps(self) -> str:
        """Tokens entering the first block, then after each pruning layer: ``197 -> 139 -> 98 -> 69``."""
        return " -> ".join(str(n) for n in (self.tokens_in[0], *(self.tokens_after(i) for i in self.layers)))

    def flops(self) -> FlopsEstimate:
        d = self.dims
        full = d.patch_macs + d.head_macs + d.depth * _block_macs(self.num_tokens, self.num_tokens, d)
        pruned = d.patch_macs + d.head_macs
        for i, n_in in enumerate(self.tokens_in):
            pruned += _block_macs(n_in, self.tokens_after(i), d)
        return FlopsEstimate(full=2 * full, pruned=2 * pruned)

    def to_dict(self) -> dict:
        """Flat JSON: the config's settings (``layers`` and ``keep_rates`` resolved), the counts, the
        FLOPs, the pruning layers and the token steps."""
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
            "dims": asdict(self.dims),
            "pruned_layers": [list(p) for p in self.pruned_layers],
            "token_steps": self.token_steps,
            "flops": self.flops().to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> KeepPlan:
        rates = tuple(data["keep_rates"])
        config = PruneConfig.from_dict({**data, "keep": rates[0] if len(set(rates)) == 1 else rates})
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
        )

    def __str__(self) -> str:
        where = ", ".join(f"block {i}: k={k}" for i, k in zip(self.layers, self.keep_counts)) or "no pruning"
        f = self.flops()
        return (
            f"KeepPlan({self.config.metric}, tokens {self.token_steps}; {where}; fuse={self.config.fuse}; "
            f"FLOPs {f.pruned / 1e9:.3g}G of {f.full / 1e9:.3g}G, bound {f.bound:.2f}x)"
        )


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
    layers = default_layers(depth) if config.layers is None else config.layers
    rates = config.rates(len(layers))
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise PlanError(f"layer {bad[0]} is out of range: this model has blocks 0..{depth - 1}")
    if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
        raise PlanError(f"layers {list(layers)} must be strictly increasing block indices")
    if num_tokens - num_prefix < 1:
        raise PlanError(f"the model has no patch tokens to prune ({num_tokens} tokens, {num_prefix} prefix)")

    tokens_in: list[int] = []
    counts: list[int] = []
    n = num_tokens
    for i in range(depth):
        tokens_in.append(n)
        if i in layers:
            cand = n - num_prefix
            # round() first: 0.7 * 130 is 91.00000000000001 in floats, and ceil would give 92.
            k = math.ceil(round(rates[layers.index(i)] * cand, 9))
            k = min(cand, max(1, math.ceil(k / config.round_to) * config.round_to))
            counts.append(k)
            n = num_prefix + k + (1 if config.fuse and k < cand else 0)
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
    )
