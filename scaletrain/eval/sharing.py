"""Every rank takes a share of an evaluation's work; the results are put back in one order.

The work is cut into *global* batches (the same cut whatever the world size) and batch j goes
to rank j mod world. A batch is therefore computed from the same inputs with the same batch
composition on any number of ranks, so a per-item result (an image, a feature row, a loss)
is the same number on 1 rank and on 64 (on one kind of device), and so is anything reduced
from them in a fixed order. Ranks with fewer batches run a padding batch (its result
dropped) until every rank has made the same number of model calls: under ZeRO-3 each forward
gathers parameters collectively, so a rank that stopped early would hang the others.

Results are assembled by a sum all-reduce of per-rank rows written into zeros: each row is
owned by exactly one rank, so the sum is exact (x + 0 = x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed() -> bool:
    return world()[1] > 1


def global_batches(n: int, batch_size: int) -> list[list[int]]:
    """Items 0..n-1 in consecutive batches of ``batch_size`` (the last may be shorter)."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


@dataclass(frozen=True)
class Share:
    """This rank's batches, and how many padding batches it runs after them."""

    batches: list[Any]
    padding: int

    @property
    def calls(self) -> int:
        return len(self.batches) + self.padding


def share_of(batches: Sequence[T], rank: int, world_size: int) -> Share:
    """Batch j goes to rank j mod world; every rank runs ceil(len / world) batches."""
    mine = list(batches[rank::world_size])
    calls = math.ceil(len(batches) / world_size) if batches else 0
    return Share(mine, calls - len(mine))


def assemble_rows(n: int, indices: Sequence[int], rows: torch.Tensor | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The full [n, ...] tensor on every rank from each rank's ``rows`` at ``indices``
    (CPU result; ``rows`` None or empty on a rank that owns none). Every rank must call it,
    with the same n and row shape and dtype (``rows`` of an idle rank: pass an empty tensor
    of the right trailing shape and dtype)."""
    if rows is None:
        raise ValueError("assemble_rows needs rows (an empty tensor where a rank owns none)")
    full = torch.zeros((n, *rows.shape[1:]), dtype=rows.dtype, device=device)
    if len(indices):
        full[torch.as_tensor(list(indices), dtype=torch.long, device=device)] = rows.to(device)
    if distributed():
        dist.all_reduce(full, op=dist.ReduceOp.SUM)
    return full.cpu()


def rank_counts(count: int, device: torch.device | str = "cpu") -> list[int]:
    """Each rank's ``count``, in rank order, on every rank."""
    rank, size = world()
    counts = torch.zeros(size, dtype=torch.float64, device=device)
    counts[rank] = count
    if size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return [int(c) for c in counts.tolist()]


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total_sum(value: float, device: torch.device | str = "cpu") -> float:
    """The sum of a number over the ranks."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())
