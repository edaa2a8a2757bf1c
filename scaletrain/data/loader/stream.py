"""The stream of one slot (one DataLoader worker of one rank): epochs -> shards -> batches.

Runs inside a DataLoader worker (or in the training process when num_workers is 0). It is an
infinite generator over epochs starting at the progress floor; in each epoch it reads the
slot's shards (:func:`.plan.shards_for_slot`) in order, each in its seeded shuffled order,
skips the positions the progress snapshot marks consumed, and puts every sample into the
buffer of its group (aspect bucket and latent shape). A buffer that reaches ``batch_size``
becomes a batch. Buffers are not flushed at the end of an epoch: leftovers are carried into
the slot's next epoch and complete a batch there (the "carry" rule in docs/data_loader.md).

Besides batches it yields *loss events* (a shard stopped early, a sample could not be
decoded) so that the training process can count them and record the lost positions as
consumed. Every item names the logical worker that made it, which is how the training
process knows where the round-robin over workers stands when it saves its state.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from scaletrain.data.loader.batching import (
    BadSample,
    PendingSample,
    SampleSchema,
    collate,
    parse_sample,
)
from scaletrain.data.loader.plan import shards_for_slot, shuffle_seed
from scaletrain.data.loader.progress import ProgressView
from scaletrain.data.loader.shard_reader import ShardFailure, read_shard_shuffled

logger = logging.getLogger(__name__)

WORKER = "__worker__"
IDS = "__ids__"
EVENT = "__event__"
# Epochs in a row in which a slot tried shards and could read none: then it gives up.
MAX_UNREADABLE_EPOCHS = 2


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs (pickled into it)."""

    shard_paths: tuple[str, ...]
    shard_sizes: tuple[int, ...]
    seed: int
    world_size: int
    num_workers: int
    rank: int
    batch_size: int
    shuffle_buffer: int
    max_text_tokens: int
    sample_latents: bool
    scaling_factor: float
    shift_factor: float
    schema: SampleSchema
    progress: ProgressView
    # The DataLoader asks its workers round-robin from physical worker 0; physical worker p
    # plays logical worker (p + rotation) % W so that a restored rank resumes the round-robin
    # with the worker that was next.
    rotation: int = 0


def _loss_event(
    worker: int, kind: str, epoch: int, shard_id: int, positions: list[int], reason: str
) -> dict[str, Any]:
    return {
        EVENT: kind,
        WORKER: worker,
        "epoch": epoch,
        "shard": shard_id,
        "positions": positions,
        "reason": reason,
    }


def slot_stream(spec: StreamSpec, worker: int) -> Iterator[dict[str, Any]]:
    """Batches and loss events of one logical worker, forever."""
    view = spec.progress
    num_shards = len(spec.shard_sizes)
    buffers: dict[tuple, list[PendingSample]] = {}
    unreadable_epochs = 0
    for epoch in itertools.count(view.floor):
        tried = read_any = False
        slot_shards = shards_for_slot(
            spec.seed, epoch, num_shards, spec.world_size, spec.num_workers, spec.rank, worker
        )
        for shard_id in slot_shards:
            if view.is_done(epoch, shard_id):
                continue
            tried = True
            consumed = view.consumed_mask(epoch, shard_id)
            path = spec.shard_paths[shard_id]
            items = read_shard_shuffled(
                path,
                spec.shard_sizes[shard_id],
                spec.shuffle_buffer,
                shuffle_seed(spec.seed, epoch, shard_id),
            )
            for item in items:
                if isinstance(item, ShardFailure):
                    lost = [p for p in item.unread if not consumed >> p & 1]
                    if lost:
                        reason = f"{path}: {item.reason}"
                        yield _loss_event(worker, "shard_failed", epoch, shard_id, lost, reason)
                    continue
                read_any = True
                if consumed >> item.position & 1:
                    continue
                try:
                    sample = parse_sample(
                        item.key, item.files, epoch, shard_id, item.position, spec.schema
                    )
                except BadSample as exc:
                    reason = f"{path}: {exc}"
                    yield _loss_event(
                        worker, "bad_sample", epoch, shard_id, [item.position], reason
                    )
                    continue
                group = buffers.setdefault(sample.group, [])
                group.append(sample)
                if len(group) == spec.batch_size:
                    del buffers[sample.group]
                    yield _batch(group, spec, worker)
            # The shard is finished: what is left of it in the buckets waits for other shards.
            for pending in buffers.values():
                for sample in pending:
                    if sample.shard_id == shard_id and sample.epoch == epoch:
                        sample.detach()
        if tried and not read_any:
            unreadable_epochs += 1
            if unreadable_epochs >= MAX_UNREADABLE_EPOCHS:
                raise RuntimeError(
                    f"rank {spec.rank} worker {worker}: none of its shards could be read in "
                    f"{unreadable_epochs} epochs in a row (last: epoch {epoch}, shards "
                    f"{slot_shards}); see the loss events logged above"
                )
        elif read_any:
            unreadable_epochs = 0


def _batch(samples: list[PendingSample], spec: StreamSpec, worker: int) -> dict[str, Any]:
    batch = collate(
        samples,
        spec.seed,
        spec.scaling_factor,
        spec.shift_factor,
        spec.max_text_tokens,
        spec.sample_latents,
    )
    batch[IDS] = [(s.epoch, s.shard_id, s.position) for s in samples]
    batch[WORKER] = worker
    return batch


class LatentShardStream(IterableDataset):
    """The IterableDataset a rank's DataLoader iterates: one slot stream per worker."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = max(1, self.spec.num_workers)
        if info is not None and info.num_workers != workers:
            raise RuntimeError(f"built for {workers} workers, run with {info.num_workers}")
        physical = info.id if info is not None else 0
        return slot_stream(self.spec, (physical + self.spec.rotation) % workers)
