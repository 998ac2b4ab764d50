"""Training-free accuracy of Col-Ln prune, Col-Ln + merge (size and score weights) and ToMe on the
bundled digits_vit (digits test split, PyTorch fp32) at FLOPs ratios near 0.4 and 0.25.

    PYTHONPATH=. python benchmarks/merge_digits.py [--json results/merge_digits.json]

Col-Ln plans: every keep rate in 0.1..0.9 at the early and EViT schedules and at blocks 1,3 and
0,1,2,3; per target every plan within 0.03 of its FLOPs ratio, each run pruned and merged with
both weights. ToMe: the r (same at every block) nearest the target. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import colln
from colln.data import load_labelled, preprocess, top1_accuracy
from colln.measure.sweep import resolve_layers
from colln.models.registry import load_model

TARGETS = (0.4, 0.25)
WINDOW = 0.03  # Col-Ln plans within this FLOPs ratio of a target are all shown
LAYER_SETS = ("early", "evit", (1, 3), (0, 1, 2, 3))


def ratio(model: torch.nn.Module) -> float:
    f = colln.get_plan(model).flops()
    return f.pruned / f.full


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return top1_accuracy(model(images), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    base = load_model("digits_vit", "bundled").eval()
    data = load_labelled("digits", base)
    images, labels = preprocess(data.images, base), torch.from_numpy(data.labels)
    plans = [(float(k) / 10, layers) for layers in resolve_layers(LAYER_SETS, len(base.blocks)) for k in range(1, 10)]
    costs = {p: ratio(colln.prune(base, keep=p[0], layers=p[1])) for p in plans}
    tome_costs = {r: ratio(colln.tome(base, r)) for r in range(1, 33)}
    rows = []
    for target in TARGETS:
        near = sorted((p for p in plans if abs(costs[p] - target) <= WINDOW), key=lambda p: costs[p])
        for keep, layers in near:
            rows.append(
                {
                    "target": target,
                    "method": "colln",
                    "plan": f"keep {keep:g} at blocks {','.join(map(str, layers))}",
                    "flops": costs[(keep, layers)],
                    "prune": accuracy(colln.prune(base, keep=keep, layers=layers), images, labels),
                    **{
                        f"merge_{w}": accuracy(
                            colln.prune(base, keep=keep, layers=layers, merge=True, merge_weight=w), images, labels
                        )
                        for w in ("size", "score")
                    },
                }
            )
        r = min(tome_costs, key=lambda r: abs(tome_costs[r] - target))
        rows.append(
            {
                "target": target,
                "method": "tome",
                "plan": f"ToMe r={r}",
                "flops": tome_costs[r],
                "tome": accuracy(colln.tome(base, r), images, labels),
            }
        )
    unpruned = accuracy(base, images, labels)
    print(f"digits_vit, {len(labels)} test images, unpruned {100 * unpruned:.1f}%\n")
    print("| FLOPs target | plan | FLOPs | Col-Ln prune | Col-Ln + merge, size | Col-Ln + merge, score | ToMe |")
    print("|---|---|---|---|---|---|---|")
    for w in rows:
        cells = [f"{100 * w[key]:.1f}" if key in w else "" for key in ("prune", "merge_size", "merge_score", "tome")]
        print(f"| {w['target']:g} | {w['plan']} | {w['flops']:.2f} | {' | '.join(cells)} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"unpruned": unpruned, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
