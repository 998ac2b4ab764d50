"""``colln-viz``: the paper's Figure 1 on your image: per pruning block, which patches Col-Ln and
[CLS] attention keep (kept patches bright, dropped ones dimmed).

    colln-viz digits_vit --image digit.png --keep 0.5 --out kept.png
    colln-viz vit_small --weights random --image astronaut.png --schedule early --out kept.png
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from colln.app.cli import ArgumentParser, parse_floats, run_main
from colln.data import data_config, open_image, preprocess
from colln.errors import CollnError, UsageError
from colln.models.rewrite import Selection, get_plan, record_selections
from colln.runtime import eval_cli
from colln.runtime.evaluate import METRIC_LABELS

DIM = 0.22  # brightness of dropped patches: dark, but the image stays recognisable
DEFAULT_SCHEDULE = "early"  # the paper's Figure 1 point: what each metric keeps near the input


class VizError(CollnError):
    stage = "viz"


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
    metric: str,
    keep: float | tuple[float, ...],
    layers: tuple[int, ...],
    norm: float,
    rescue: float,
    fuse: bool,
) -> MetricView:
    """Prune ``model`` with ``metric``, run ``x`` (one image) and map its selections to patches."""
    from colln.models.rewrite import prune

    pruned = prune(model, keep=keep, layers=layers, metric=metric, norm=norm, rescue=rescue, fuse=fuse)
    with record_selections(pruned) as selections, torch.inference_mode():
        logits = pruned(x)
    kept = dict(kept_patches(selections, model.patch_embed.num_patches))
    # Blocks whose keep count is every candidate are not wrapped and record nothing: all kept there.
    last = np.arange(model.patch_embed.num_patches)
    ordered = []
    for layer in get_plan(pruned).layers:
        last = kept.get(layer, last)
        ordered.append((layer, last))
    return MetricView(metric=metric, kept=ordered, predicted=int(logits.argmax(-1)[0]))


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


def render(
    img: np.ndarray,
    views: Sequence[MetricView],
    grid: tuple[int, int],
    title: str,
    out: Path,
    dpi: int = 100,
) -> None:
    """Rows: metrics; columns: the input, then each pruning block. Written atomically to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + max(len(v.kept) for v in views)
    fig, axes = plt.subplots(len(views), cols, figsize=(2.6 * cols, 2.75 * len(views) + 0.6), squeeze=False)
    total = grid[0] * grid[1]
    for row, v in zip(axes, views):
        row[0].imshow(img, interpolation="nearest")
        row[0].set_title("input", fontsize=9)
        row[0].set_ylabel(f"{METRIC_LABELS.get(v.metric, v.metric)}\npredicts {v.predicted}", fontsize=10)
        for ax, (layer, kept) in zip(row[1:], v.kept):
            ax.imshow(overlay(img, kept, grid), interpolation="nearest")
            ax.set_title(f"after block {layer}: {len(kept)}/{total} patches", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in row[1 + len(v.kept) :]:
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="colln-viz",
        description="Which patches Col-Ln and [CLS] attention keep at each pruning block, drawn over the image.",
    )
    eval_cli.add_model_args(parser, default_schedule=DEFAULT_SCHEDULE, sweep=False)
    parser.add_argument("--image", type=Path, required=True, help="the image (PNG, JPEG, ...)")
    parser.add_argument("--keep", default="0.5", help="keep rate, one for every pruning block or one per block (default 0.5)")
    parser.add_argument("--metric", default="colln,cls", help="metrics to draw, one row each (default colln,cls)")
    parser.add_argument("--out", type=Path, required=True, help="output PNG file (replaced if it exists)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default 100; lower for smaller files)")
    return parser


def main_args(
    args: argparse.Namespace,
) -> int:
    from colln.models.registry import default_weights, load_model

    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out {args.out} must be a .png file")
    keep = parse_floats(args.keep, "--keep")
    norms = parse_floats(args.norm, "--norm")
    if len(norms) != 1:
        raise UsageError("colln-viz draws one norm order: give --norm N (e.g. 4)")
    metrics = eval_cli.parse_metrics(args.metric)
    model = load_model(args.model, args.weights, args.img_size)
    sets = eval_cli.layer_sets(args, len(model.blocks), default=DEFAULT_SCHEDULE)
    if len(sets) != 1:
        raise UsageError("colln-viz draws one set of pruning blocks: give one --layers or one --schedule")
    x = preprocess([open_image(args.image)], model)
    keep_arg = keep[0] if len(keep) == 1 else keep
    views = [view(model, x, m, keep_arg, sets[0], norms[0], args.rescue, args.fuse) for m in metrics]
    grid = tuple(model.patch_embed.grid_size)
    weights = args.weights or default_weights(args.model)
    note = " (RANDOM weights: selections are not meaningful)" if weights == "random" else f" ({weights} weights)"
    title = f"{args.model}{note}, keep {args.keep} at blocks {','.join(map(str, sets[0]))}; dimmed patches are dropped"
    if args.dpi < 20:
        raise UsageError(f"--dpi {args.dpi} is too small to read: use 50 or more")
    render(display_image(x, model), views, grid, title, args.out, args.dpi)
    print(f"wrote {args.out}")
    return 0


def main(
    argv: Sequence[str] | None = None,
) -> int:
    return run_main(main_args, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
