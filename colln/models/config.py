"""The prune settings, once: every layer of colln passes a :class:`PruneConfig` whole."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal

from colln.errors import PlanError

Metric = Literal["colln", "cls", "correct"]
METRICS: tuple[str, ...] = ("colln", "cls", "correct")
Output = Literal["logits", "tokens", "dense"]
OUTPUTS: tuple[str, ...] = ("logits", "tokens", "dense")
Order = Literal["spatial", "score"]
ORDERS: tuple[str, ...] = ("spatial", "score")
MergeWeight = Literal["size", "score"]
MERGE_WEIGHTS: tuple[str, ...] = ("size", "score")
DEFAULT_FEATURE_LAYER = -2  # LLaVA's mm_vision_select_layer: the output of block depth-2


@dataclass(frozen=True)
class PruneConfig:
    """Where and how much a ViT is pruned. ``None`` = the model's default.

    ``keep``: one rate in (0, 1] for every pruning layer, or one per layer. ``layers``: pruning
    blocks (``None``: EViT's 3, 6, 9 of 12 scaled to the depth). ``metric``: ``colln`` (Col-Ln of
    order ``norm``), ``cls`` ([CLS] attention) or ``correct`` ([CLS] with a Col-Ln ``rescue`` share).
    ``fuse``: EViT's fused token. ``spatial_order``: kept tokens in image order. ``round_to``: keep
    counts rounded up to a multiple of it. Invalid values raise :class:`PlanError` at construction.

    ``output="dense"`` (dense prediction): the model returns ``[B, num_patches, C]`` on the full patch
    grid, each pruned patch with the features it had when it was dropped (the plan is the logits one).

    ``output="tokens"`` (vision towers of VLMs): the model returns ``(tokens [B, K, C], indices [B, K])``,
    the features of block ``feature_layer`` (negative: from the end; ``None``: -2) at the K patch tokens
    the metric picks from that block's own attention, K = ``ceil(keep[-1] * num_patches)``. ``keep``
    then holds one rate per inner pruning layer (``layers``, default none) and, last, the final rate.
    ``merge``: each kept token absorbs its most similar pruned tokens (PruMerge). ``order``: of the
    returned tokens (``None``: spatial). ``feature_layer`` and ``order`` are for ``output="tokens"`` only.

    Merging instead of dropping: ``merge`` with logits output makes each pruning layer's dropped
    candidates join their most similar kept token (key cosine) inside the encoder; ``tome=r`` (one r
    for every block of ``layers``, default all blocks, or one per layer) is ToMe's bipartite soft
    matching, which merges r tokens per block (``keep`` must then stay 1.0). Merged tokens carry
    sizes; ``merge_weight`` averages them by ``size`` or by ``score`` x size (``None``: score for
    tokens output, PruMerge's, and size for logits); ``prop_attn`` adds log(size) to the attention
    logits of the blocks after a merge (ToMe's proportional attention).
    """

    keep: float | tuple[float, ...] = 0.7
    layers: tuple[int, ...] | None = None
    metric: Metric = "colln"
    norm: float = 4.0
    rescue: float = 0.2
    fuse: bool = False
    spatial_order: bool = False
    round_to: int = 1
    output: Output = "logits"
    feature_layer: int | None = None
    merge: bool = False
    order: Order | None = None
    tome: int | tuple[int, ...] | None = None
    merge_weight: MergeWeight | None = None
    prop_attn: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.keep, Sequence):
            object.__setattr__(self, "keep", tuple(self.keep))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if isinstance(self.tome, Sequence):
            object.__setattr__(self, "tome", tuple(self.tome))
        rates = self.keep if isinstance(self.keep, tuple) else (self.keep,)
        if not rates:
            raise PlanError("keep is empty: give one rate, or one per pruning layer")
        for r in rates:
            if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 < r <= 1.0:
                raise PlanError(f"keep rate {r!r} is outside (0, 1]: use e.g. 0.7 to keep 70% of the tokens")
        if self.metric not in METRICS:
            raise PlanError(f"unknown metric {self.metric!r}: choose one of {', '.join(METRICS)}")
        if not self.norm > 0:
            raise PlanError(f"norm order {self.norm!r} must be > 0 (the paper uses 4)")
        if not 0.0 <= self.rescue < 1.0:
            raise PlanError(f"rescue ratio {self.rescue!r} must be in [0, 1) (the paper uses 0.2 or 0.4)")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise PlanError(f"round_to {self.round_to!r} must be a positive integer")
        self._check_output()
        self._check_merge()

    @property
    def merges(self) -> bool:
        """Whether tokens are merged inside the encoder (sizes tracked): ToMe, or ``merge`` with logits."""
        return self.tome is not None or (self.merge and self.output != "tokens")

    @property
    def weight(self) -> str:
        """The merge weighting in effect (``merge_weight`` resolved)."""
        return self.merge_weight or ("score" if self.output == "tokens" else "size")

    def _check_merge(self) -> None:
        if self.merge_weight is not None and self.merge_weight not in MERGE_WEIGHTS:
            raise PlanError(f"unknown merge weight {self.merge_weight!r}: choose one of {', '.join(MERGE_WEIGHTS)}")
        if self.merge and self.fuse:
            raise PlanError("--merge and --fuse both keep the pruned tokens' content: choose one")
        if self.tome is None:
            return
        rs = self.tome if isinstance(self.tome, tuple) else (self.tome,)
        bad = [r for r in rs if not isinstance(r, int) or isinstance(r, bool) or r < 0]
        if not rs:
            raise PlanError("ToMe r is empty: give one r, or one per merging block")
        if bad:
            raise PlanError(f"ToMe r {bad[0]!r} must be a non-negative integer (tokens merged per block)")
        conflicts = [
            name
            for name, on in (
                ("--keep", any(r != 1.0 for r in (self.keep if isinstance(self.keep, tuple) else (self.keep,)))),
                ("--merge", self.merge),
                ("--fuse", self.fuse),
                ("--output tokens", self.output == "tokens"),
            )
            if on
        ]
        if conflicts:
            raise PlanError(f"--tome cannot be combined with {conflicts[0]}: ToMe merges r tokens per block, give one of them")

    def _check_output(self) -> None:
        if self.output not in OUTPUTS:
            raise PlanError(f"unknown output {self.output!r}: choose one of {', '.join(OUTPUTS)}")
        if self.order is not None and self.order not in ORDERS:
            raise PlanError(f"unknown order {self.order!r}: choose one of {', '.join(ORDERS)}")
        if self.output != "tokens":
            extra = [
                name
                for name, on in (
                    ("feature_layer", self.feature_layer is not None),
                    ("order", self.order is not None),
                )
                if on
            ]
            if extra:
                raise PlanError(f"{extra[0]} applies to output 'tokens' only: add --output tokens")
            if self.output == "dense" and self.fuse:
                raise PlanError(
                    "--fuse does not apply to output 'dense': a fused token is no patch and has no place on the grid; use --merge"
                )
            return
        if self.feature_layer is not None and (not isinstance(self.feature_layer, int) or isinstance(self.feature_layer, bool)):
            raise PlanError(f"feature layer {self.feature_layer!r} must be a block index, e.g. -2 (the penultimate block)")
        if self.fuse:
            raise PlanError(
                "--fuse does not apply to output 'tokens': a fused token is no patch and has no patch id; use --merge"
            )

    @classmethod
    def of(
        cls,
        keep: float | Sequence[float] | PruneConfig = 0.7,
        **settings: object,
    ) -> PruneConfig:
        """``keep`` and keyword settings (names of the fields) -> a config; a config passes through."""
        if isinstance(keep, PruneConfig):
            if settings:
                raise PlanError(f"give a PruneConfig or settings, not both (got {', '.join(settings)})")
            return keep
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            names = ", ".join(f.name for f in fields(cls))
            raise PlanError(f"unknown prune setting {unknown[0]!r}: the settings are {names}")
        return cls(keep=keep, **settings)  # type: ignore[arg-type]

    def rates(
        self,
        num_layers: int,
    ) -> tuple[float, ...]:
        """One keep rate per pruning layer."""
        rates = self.keep if isinstance(self.keep, tuple) else (self.keep,) * num_layers
        if len(rates) != num_layers:
            if self.output == "tokens":
                raise PlanError(
                    f"{len(rates)} keep rates for {num_layers - 1} inner pruning layers and the final selection: "
                    "give one rate, or one per layer followed by the final rate"
                )
            raise PlanError(f"{len(rates)} keep rates for {num_layers} pruning layers: give one rate or one per layer")
        return tuple(float(r) for r in rates)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["keep"] = list(self.keep) if isinstance(self.keep, tuple) else self.keep
        out["layers"] = list(self.layers) if self.layers is not None else None
        out["tome"] = list(self.tome) if isinstance(self.tome, tuple) else self.tome
        return out

    @classmethod
    def from_dict(
        cls,
        data: dict,
    ) -> PruneConfig:
        """From :meth:`to_dict` output; keys that are not settings are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _joined(
    value: float | tuple[float, ...],
    sep: str,
) -> str:
    return sep.join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"


def config_flags(
    config: PruneConfig,
) -> list[str]:
    """The colln-export / colln-finetune arguments that give ``config``, one way for every caller:
    ``--keep`` (or ToMe's ``--tome``), ``--layers`` unless None (the default), the metric with the
    settings it reads (``--norm`` for colln and correct, ``--rescue`` for correct when not the
    default), then every other setting that is not its default."""
    layers = [] if config.layers is None else ["--layers", ",".join(map(str, config.layers))]
    merging = [] if config.prop_attn else ["--no-prop-attn"]
    if config.tome is not None:
        return ["--tome", _joined(config.tome, ","), *layers, *merging]
    flags = ["--keep", _joined(config.keep, ","), *layers, "--metric", config.metric]
    flags += ["--norm", f"{config.norm:g}"] if config.metric != "cls" else []
    flags += ["--rescue", f"{config.rescue:g}"] if config.metric == "correct" and config.rescue != PruneConfig.rescue else []
    flags += ["--fuse"] if config.fuse else []
    flags += ["--spatial-order"] if config.spatial_order else []
    flags += ["--round-to", str(config.round_to)] if config.round_to != PruneConfig.round_to else []
    flags += ["--output", config.output] if config.output != PruneConfig.output else []
    flags += ["--feature-layer", str(config.feature_layer)] if config.feature_layer is not None else []
    flags += ["--order", config.order] if config.order is not None else []
    if config.merge:
        flags += ["--merge", *(["--merge-weight", config.merge_weight] if config.merge_weight else []), *merging]
    return flags


def config_name(
    config: PruneConfig,
    precision: str = "fp32",
    *,
    detail: bool = False,
) -> str:
    """A configuration's name, one scheme for every caller: ``colln-keep0.7``,
    ``cls-tokens-keep0.7-0.5-merge-int8``, ``tome8-4-fp16`` (an export directory's name after the
    model's). ``detail`` adds what the rows of one sweep vary besides: the norm order and the
    layers (``colln-n4-keep0.7-L3.6.9-merge``, ``tome-r8``; colln-eval's row keys)."""
    suffix = "" if precision == "fp32" else f"-{precision}"
    if config.tome is not None:
        return f"tome{'-r' if detail else ''}{_joined(config.tome, '-')}{suffix}"
    output = "" if config.output == PruneConfig.output else f"-{config.output}"
    merge = "-merge" if config.merge else ""
    if detail:
        layers = ".".join(map(str, config.layers or ()))
        return f"{config.metric}{output}-n{config.norm:g}-keep{_joined(config.keep, '-')}-L{layers}{merge}{suffix}"
    return f"{config.metric}{output}-keep{_joined(config.keep, '-')}{merge}{suffix}"
