"""``colln-viz``: the paper's Figure 1 on your image: per pruning block, which patches Col-Ln and
[CLS] attention keep (kept patches bright, dropped ones dimmed).

    colln-viz digits_vit --image digit.png --keep 0.5 --out kept.png
    colln-viz vit_small --weights random --image astronaut.png --schedule early --out kept.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from colln.app.cli import ArgumentParser, add_model_args, entry_point, layer_choices, parse_floats, parse_metrics
from colln.data import open_image, preprocess
from colln.errors import UsageError
from colln.measure.sweep import resolve_layers
from colln.models.adapters import model_adapter
from colln.models.config import PruneConfig
from colln.models.registry import default_weights, load_model
from colln.report.plots import kept_figure
from colln.report.viz import display_image, view

DEFAULT_SCHEDULE = "early"  # the paper's Figure 1 point: what each metric keeps near the input


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="colln-viz",
        description="Which patches Col-Ln and [CLS] attention keep at each pruning block, drawn over the image.",
    )
    add_model_args(parser, default_schedule=DEFAULT_SCHEDULE, sweep=False)
    parser.add_argument("--image", type=Path, required=True, help="the image (PNG, JPEG, ...)")
    parser.add_argument("--keep", default="0.5", help="keep rate, one for every pruning block or one per block (default 0.5)")
    parser.add_argument("--metric", default="colln,cls", help="metrics to draw, one row each (default colln,cls)")
    parser.add_argument("--out", type=Path, required=True, help="output PNG file (replaced if it exists)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default 100; lower for smaller files)")
    return parser


def run(
    args: argparse.Namespace,
) -> int:
    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out {args.out} must be a .png file")
    keep = parse_floats(args.keep, "--keep")
    norms = parse_floats(args.norm, "--norm")
    if len(norms) != 1:
        raise UsageError("colln-viz draws one norm order: give --norm N (e.g. 4)")
    metrics = parse_metrics(args.metric)
    model = load_model(args.model, args.weights, args.img_size)
    family = model_adapter(model)
    sets = resolve_layers(layer_choices(args, default=DEFAULT_SCHEDULE), len(family.blocks(model)))
    if len(sets) != 1:
        raise UsageError("colln-viz draws one set of pruning blocks: give one --layers or one --schedule")
    x = preprocess([open_image(args.image)], model)
    keep_arg = keep[0] if len(keep) == 1 else keep
    views = [
        view(model, x, PruneConfig(keep=keep_arg, layers=sets[0], metric=m, norm=norms[0], rescue=args.rescue, fuse=args.fuse))
        for m in metrics
    ]
    grid = family.grid(model)
    weights = args.weights or default_weights(args.model)
    note = " (RANDOM weights: selections are not meaningful)" if weights == "random" else f" ({weights} weights)"
    title = f"{args.model}{note}, keep {args.keep} at blocks {','.join(map(str, sets[0]))}; dimmed patches are dropped"
    if args.dpi < 20:
        raise UsageError(f"--dpi {args.dpi} is too small to read: use 50 or more")
    kept_figure(display_image(x, model), views, grid, title, args.out, args.dpi)
    print(f"wrote {args.out}")
    return 0


main = entry_point(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
