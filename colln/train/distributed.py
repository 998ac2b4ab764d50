"""PyTorch DDP under torchrun: process group set-up and tear-down, rank facts, sums across ranks.

torchrun exports RANK, WORLD_SIZE and LOCAL_RANK; without them (or with WORLD_SIZE=1) everything
here is a no-op and the same code runs as one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks() -> Ranks:
    """This process's place as torchrun describes it (rank 0 of 1 outside torchrun)."""
    return Ranks(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


@contextlib.contextmanager
def process_group(
    device: torch.device,
    *,
    timeout: timedelta | None = None,
) -> Iterator[Ranks]:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) for the duration; a group the
    caller already set up is used and left alone. ``timeout``: how long any collective (the
    rendezvous included) waits for the other ranks before it raises; None: torch's default
    (30 minutes on gloo, 10 on nccl)."""
    ranks = env_ranks()
    own = ranks.world_size > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    # Without the barrier before tear-down, a rank that leaves while another still talks aborts
    # ("terminate called without an active exception") about one run in four on gloo.
    try:
        yield ranks
    except BaseException:
        if own:
            # The others may wait in another collective, which the barrier does not match: it then
            # waits out the timeout, and the error that brought this rank here is the one to report.
            with contextlib.suppress(RuntimeError):
                dist.barrier()
            dist.destroy_process_group()
        raise
    if own:
        dist.barrier()
        dist.destroy_process_group()


def all_sum(
    values: list[float],
    ranks: Ranks,
) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64, on CPU for gloo and nccl alike)."""
    if ranks.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(
    flag: bool,
    ranks: Ranks,
) -> bool:
    """True on every rank when ``flag`` is true on one (so all ranks stop at the same step)."""
    return all_sum([float(flag)], ranks)[0] > 0


def gather_to_main(
    value: object,
    ranks: Ranks,
) -> list[object] | None:
    """Every rank's ``value`` in rank order on rank 0, None on the others (``[value]`` outside torchrun)."""
    if ranks.world_size == 1:
        return [value]
    gathered: list[object] | None = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered
