"""The deterministic epoch plan: which shards each (rank, worker) reads, in which order.

Pure functions of (seed, epoch, number of shards, layout) so that every rank, every worker
and :func:`~scaletrain.data.loader.progress.merge_states` compute the same answer without
talking to each other, and a resumed run recomputes exactly the plan it left.

* **Shard order of epoch e**: the shard ids sorted by a hash of (seed, e, id). A hash, not a
  library RNG, so that the order cannot change with a torch or numpy upgrade.
* **Slots**: a rank with W DataLoader workers has W slots (W = max(1, num_workers)); the
  ``S = world * W`` slots of the job are numbered ``slot = rank + world * worker``.
* **Dealing**: the shard at position i of epoch e's order goes to slot ``(e*n + i) mod S``,
  like dealing cards round-robin without restarting at each epoch. Every slot gets
  floor(n/S) or ceil(n/S) shards per epoch, and the slots that get one more rotate, so the work
  per slot stays balanced over consecutive epochs (no slot drifts epochs ahead of another).
* The same rule with the new (world, W) assigns what remains of an unfinished epoch after a
  resume on a different layout: a shard always belongs to exactly one slot.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

MASK63 = (1 << 63) - 1


def stable_hash(*parts: object) -> int:
    """A 63-bit hash of the parts' text, identical on every machine and Python version."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & MASK63


@lru_cache(maxsize=16)
def shard_order(seed: int, epoch: int, num_shards: int) -> tuple[int, ...]:
    """Epoch ``epoch``'s permutation of shard ids."""
    return tuple(sorted(range(num_shards), key=lambda i: stable_hash(seed, "shards", epoch, i)))


def num_slots(world_size: int, num_workers: int) -> int:
    return world_size * max(1, num_workers)


def slot_of(rank: int, worker: int, world_size: int) -> int:
    return rank + world_size * worker


def shards_for_slot(
    seed: int,
    epoch: int,
    num_shards: int,
    world_size: int,
    num_workers: int,
    rank: int,
    worker: int,
) -> list[int]:
    """The shard ids (in reading order) of one worker of one rank in one epoch."""
    slots = num_slots(world_size, num_workers)
    slot = slot_of(rank, worker, world_size)
    order = shard_order(seed, epoch, num_shards)
    offset = (epoch * num_shards) % slots
    first = (slot - offset) % slots
    return list(order[first::slots])


@lru_cache(maxsize=64)
def shards_for_rank(
    seed: int, epoch: int, num_shards: int, world_size: int, num_workers: int, rank: int
) -> frozenset[int]:
    """Every shard id that any worker of ``rank`` reads in ``epoch``."""
    owned: set[int] = set()
    for worker in range(max(1, num_workers)):
        owned.update(
            shards_for_slot(seed, epoch, num_shards, world_size, num_workers, rank, worker)
        )
    return frozenset(owned)


def shuffle_seed(seed: int, epoch: int, shard_id: int) -> int:
    """Seed of the shuffle inside one shard in one epoch."""
    return stable_hash(seed, "shuffle", epoch, shard_id)

