"""The keep plan: token counts and keep counts fixed at rewrite time (no timm import)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from colln.errors import PlanError
from colln.models.ops import METRICS


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
    """Immutable description of where and how much a ViT is pruned.

    ``tokens_in[i]`` counts the tokens entering block ``i`` (prefix included); ``keep_counts[j]``
    is ``k`` at ``layers[j]``: ``ceil(keep_rates[j] * (tokens_in - num_prefix))``, rounded up to a
    multiple of ``round_to`` and capped at the candidate count.
    """

    num_tokens: int
    num_prefix: int
    depth: int
    layers: tuple[int, ...]
    keep_rates: tuple[float, ...]
    keep_counts: tuple[int, ...]
    tokens_in: tuple[int, ...]
    tokens_out: int
    fuse: bool
    metric: str
    norm: float
    rescue: float
    spatial_order: bool
    round_to: int
    dims: ModelDims

    def k_at(self, layer: int) -> int:
        return self.keep_counts[self.layers.index(layer)]

    def tokens_after(self, layer: int) -> int:
        """Tokens leaving block ``layer`` (the input of the next block)."""
        return self.tokens_in[layer + 1] if layer + 1 < self.depth else self.tokens_out

    def flops(self) -> FlopsEstimate:
        d = self.dims
        full = d.patch_macs + d.head_macs + d.depth * _block_macs(self.num_tokens, self.num_tokens, d)
        pruned = d.patch_macs + d.head_macs
        for i, n_in in enumerate(self.tokens_in):
            pruned += _block_macs(n_in, self.tokens_after(i), d)
        return FlopsEstimate(full=2 * full, pruned=2 * pruned)

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("layers", "keep_rates", "keep_counts", "tokens_in"):
            out[key] = list(out[key])
        out["flops"] = self.flops().to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "KeepPlan":
        fields = {k: v for k, v in data.items() if k != "flops"}
        for key in ("layers", "keep_rates", "keep_counts", "tokens_in"):
            fields[key] = tuple(fields[key])
        fields["dims"] = ModelDims(**fields["dims"])
        return cls(**fields)

    def __str__(self) -> str:
        steps = " -> ".join(str(n) for n in (self.tokens_in[0], *(self.tokens_after(i) for i in self.layers)))
        where = ", ".join(f"block {i}: k={k}" for i, k in zip(self.layers, self.keep_counts)) or "no pruning"
        f = self.flops()
        return (
            f"KeepPlan({self.metric}, tokens {steps}; {where}; fuse={self.fuse}; "
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
    keep: float | Sequence[float] = 0.7,
    layers: Sequence[int] | None = None,
    metric: str = "colln",
    norm: float = 4.0,
    rescue: float = 0.2,
    fuse: bool = False,
    spatial_order: bool = False,
    round_to: int = 1,
) -> KeepPlan:
    """Build a KeepPlan. ``layers=None`` means :func:`default_layers`; ``keep`` is one rate for every
    pruning layer or one rate per layer. Raises :class:`PlanError` on anything invalid."""
    depth = dims.depth
    layers = default_layers(depth) if layers is None else tuple(int(i) for i in layers)
    rates = (keep,) * len(layers) if isinstance(keep, (int, float)) else tuple(keep)
    _check(layers, rates, depth, metric, norm, rescue, round_to, num_tokens, num_prefix)

    tokens_in: list[int] = []
    counts: list[int] = []
    n = num_tokens
    for i in range(depth):
        tokens_in.append(n)
        if i in layers:
            rate = rates[layers.index(i)]
            cand = n - num_prefix
            # round() first: 0.7 * 130 is 91.00000000000001 in floats, and ceil would give 92.
            k = math.ceil(round(rate * cand, 9))
            k = min(cand, max(1, math.ceil(k / round_to) * round_to))
            counts.append(k)
            n = num_prefix + k + (1 if fuse and k < cand else 0)
    return KeepPlan(
        num_tokens=num_tokens,
        num_prefix=num_prefix,
        depth=depth,
        layers=layers,
        keep_rates=tuple(float(r) for r in rates),
        keep_counts=tuple(counts),
        tokens_in=tuple(tokens_in),
        tokens_out=n,
        fuse=fuse,
        metric=metric,
        norm=float(norm),
        rescue=float(rescue),
        spatial_order=spatial_order,
        round_to=round_to,
        dims=dims,
    )


def _check(
    layers: tuple[int, ...],
    rates: tuple[float, ...],
    depth: int,
    metric: str,
    norm: float,
    rescue: float,
    round_to: int,
    num_tokens: int,
    num_prefix: int,
) -> None:
    if metric not in METRICS:
        raise PlanError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    if len(rates) != len(layers):
        raise PlanError(f"{len(rates)} keep rates for {len(layers)} pruning layers: give one rate or one per layer")
    for r in rates:
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 < r <= 1.0:
            raise PlanError(f"keep rate {r!r} is outside (0, 1]: use e.g. 0.7 to keep 70% of the tokens")
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise PlanError(f"layer {bad[0]} is out of range: this model has blocks 0..{depth - 1}")
    if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
        raise PlanError(f"layers {list(layers)} must be strictly increasing block indices")
    if not norm > 0:
        raise PlanError(f"norm order {norm!r} must be > 0 (the paper uses 4)")
    if not 0.0 <= rescue < 1.0:
        raise PlanError(f"rescue ratio {rescue!r} must be in [0, 1) (the paper uses 0.2 or 0.4)")
    if round_to < 1:
        raise PlanError(f"round_to {round_to!r} must be a positive integer")
    if num_tokens - num_prefix < 1:
        raise PlanError(f"the model has no patch tokens to prune ({num_tokens} tokens, {num_prefix} prefix)")
