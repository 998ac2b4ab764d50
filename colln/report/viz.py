"""What each metric keeps on one image, per pruning block, as patch positions: the data behind
``colln-viz`` (the paper's Figure 1; drawn by :func:`colln.report.plots.kept_figure`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from colln.data import data_config
from colln.errors import VizError
from colln.models.config import PruneConfig
from colln.models.rewrite import Selection, get_plan, prune, record_selections

DIM = 0.22  # brightness of dropped patches: dark, but the image stays recognisable


def kept_patches(
    selections: Sequence[Selection],
    num_patches: int,
    image: int = 0,
) -> list[tuple[int, np.ndarray]]:
    """For each pruning block in order, the original patch positions (row-major) still kept after it.

    A later block's indices index the candidates that entered it: the tokens kept by the previous
    pruning block, in the order that block output them (score order, or spatial with
    ``spatial_order``), plus EViT's fused token last when fusing. The fused token is not a patch:
    it is tracked as -1 so that later indices still line up, and never reported as kept.
    """
    positions = np.arange(num_patches)
    out = []
    for sel in selections:
        extra = sel.scores.shape[-1] - len(positions)
        if extra not in (0, 1):
            raise VizError(
                f"block {sel.layer} had {sel.scores.shape[-1]} candidates but {len(positions)} tokens were tracked: "
                "record the selections of exactly one forward"
            )
        candidates = np.concatenate([positions, np.full(extra, -1)])
        positions = candidates[sel.indices[image].cpu().numpy()]
        out.append((sel.layer, positions[positions >= 0]))
    return out


@dataclass(frozen=True)
class MetricView:
    """What one metric keeps on one image: per pruning block the kept patch positions."""

    metric: str
    kept: list[tuple[int, np.ndarray]]
    predicted: int


def view(
    model: nn.Module,
    x: torch.Tensor,
    config: PruneConfig,
) -> MetricView:
    """Prune ``model`` with ``config``, run ``x`` (one image) and map its selections to patches."""
    pruned = prune(model, config)
    with record_selections(pruned) as selections, torch.inference_mode():
        logits = pruned(x)
    plan = get_plan(pruned)
    kept = dict(kept_patches(selections, plan.num_patches))
    # Blocks whose keep count is every candidate are not wrapped and record nothing: all kept there.
    last = np.arange(plan.num_patches)
    ordered = []
    for layer in plan.layers:
        last = kept.get(layer, last)
        ordered.append((layer, last))
    return MetricView(metric=config.metric, kept=ordered, predicted=int(logits.argmax(-1)[0]))


def display_image(
    x: torch.Tensor,
    model: nn.Module,
) -> np.ndarray:
    """The model's input (after resize/crop) back in [0, 1] RGB ``[H, W, 3]``: patches line up with it."""
    cfg = data_config(model)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    return (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def overlay(
    img: np.ndarray,
    kept: np.ndarray,
    grid: tuple[int, int],
) -> np.ndarray:
    """``img`` with every patch not in ``kept`` dimmed."""
    mask = np.zeros(grid[0] * grid[1])
    mask[kept] = 1.0
    ph, pw = img.shape[0] // grid[0], img.shape[1] // grid[1]
    full = np.kron(mask.reshape(grid), np.ones((ph, pw)))
    return img * (DIM + (1.0 - DIM) * full[..., None])
