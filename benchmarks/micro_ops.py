"""Micro-benchmarks behind the formulations in colln/models/ops.py, on ONNX Runtime CPU.

    python benchmarks/micro_ops.py [--batch 8] [--tokens 197] [--dim 384] [--rounds 200] [--threads 1]

Each pair computes the same thing two ways (checked equal) and is timed interleaved:
  * the Col-Ln power: ``Pow(x, 4)`` vs ``x*x`` squared (what ``ops._power`` exports),
  * the token gather: ``torch.gather`` (ONNX GatherElements over ``[B, k, C]`` indices) vs a row
    Gather over the batch-flattened tokens (what ``ops.gather_tokens`` exports),
  * the score order: head-mean then slice the candidate columns vs slice then head-mean,
  * and what the Col-Ln score costs over the [CLS] score (``cls``; not equal, timed alongside).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from colln.infer.runners import onnxruntime_runner
from colln.infer.timing import interleaved_times, paired_speedup


class PowScore(torch.nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.mean(dim=1)[:, :, 1:].pow(4).sum(dim=1)


class MulScore(torch.nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        sq = a.mean(dim=1)[:, :, 1:]
        sq = sq * sq
        return (sq * sq).sum(dim=1)


class SliceFirstScore(torch.nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        sq = a[:, :, :, 1:].mean(dim=1)
        sq = sq * sq
        return (sq * sq).sum(dim=1)


class ClsScore(torch.nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.mean(dim=1)[:, 0, 1:]


class GatherElements(torch.nn.Module):
    def forward(self, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 1, i.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class RowGather(torch.nn.Module):
    def forward(self, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        rows = (i + torch.arange(b).unsqueeze(-1) * n).reshape(-1)
        return x.reshape(b * n, c).index_select(0, rows).reshape(b, -1, c)


def compare(
    title: str,
    modules: dict[str, torch.nn.Module],
    inputs: tuple[torch.Tensor, ...],
    rounds: int,
    threads: int,
    tmp: Path,
    unchecked: tuple[str, ...] = (),
) -> None:
    runners, outputs = {}, []
    for name, module in modules.items():
        path = tmp / f"{name}.onnx"
        names = ["x", "i"][: len(inputs)]
        torch.onnx.export(module.eval(), inputs, str(path), dynamo=True, opset_version=18, input_names=names, verbose=False)
        runners[name] = onnxruntime_runner(path, threads=threads)
        outputs.append(module(*inputs))
    for name, out in zip(modules, outputs):
        if name not in unchecked:
            torch.testing.assert_close(out, outputs[0], rtol=1e-5, atol=1e-6)
    feed = {n: t.numpy() for n, t in zip(["x", "i"], inputs)}
    for r in runners.values():
        r.activate()
    try:
        times = interleaved_times(runners, feed, rounds, warmup=10)
    finally:
        for r in runners.values():
            r.deactivate()
    first = next(iter(times))
    print(f"{title}:")
    for name, t in times.items():
        ratio, lo, hi = paired_speedup(times[first], t)
        print(f"  {name:>14}: p50 {np.median(t) * 1e3:.3f} ms, {ratio:.2f}x vs {first} (IQR {lo:.2f}-{hi:.2f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    b, n = args.batch, args.tokens
    attn = torch.rand(b, args.heads, n, n).softmax(dim=-1)
    x = torch.randn(b, n - 1, args.dim)
    idx = torch.stack([torch.randperm(n - 1)[: int(0.7 * (n - 1))] for _ in range(b)])
    print(f"ORT CPU, intra-op threads {args.threads}, batch {b}, {n} tokens, {args.heads} heads, dim {args.dim}")
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"pow": PowScore(), "mul": MulScore(), "slice-first": SliceFirstScore(), "cls": ClsScore()}
        compare("Col-Ln score, n = 4", variants,
                (attn,), args.rounds, args.threads, Path(tmp), unchecked=("cls",))  # fmt: skip
        compare("token gather", {"gather-elements": GatherElements(), "row-gather": RowGather()},
                (x, idx), args.rounds, args.threads, Path(tmp))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
