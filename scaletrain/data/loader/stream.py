"""The stream of one slot (one DataLoader worker of one rank): sources -> epochs -> shards ->
batches.

Runs inside a DataLoader worker (or in the training process when num_workers is 0). Per
source it keeps a lazy stream over that source's epochs, starting at its progress floor: in
each epoch it reads the slot's shards of the source (:func:`.plan.shards_for_slot` on the
epoch's shard list) in order, each in its seeded shuffled order, skips the positions the
progress snapshot marks consumed, and puts every sample into the buffer of its group (aspect
bucket and latent shape). A buffer that reaches ``batch_size`` becomes a batch. Buffers are
not flushed at the end of an epoch: leftovers are carried into the source's next epoch and
complete a batch there (the "carry" rule in docs/data_loader.md).

**Mixture.** The slot knows the global index g of every batch it makes: the DataLoader asks
its workers strictly round-robin and every item a worker yields is one batch, so the rank's
k-th batch comes from logical worker ``(rotation + k) mod W`` and is global batch
``base + k * world + rank``. Batch g is drawn from source :func:`choose_source` (seed, g): a
pure function of the seed and the samples seen, so the share of each source is the same in
every layout and after every resume. A source whose every shard in the slot failed in two
epochs in a row is dropped from this slot's choices (and said so); training goes on with the
others.

Loss events (a shard stopped early, a sample could not be decoded), remote-read counters and
notes ride on the next batch, so that the training process records them when it hands that
batch out, never earlier.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from scaletrain.data import storage
from scaletrain.data.loader.batching import (
    BadSample,
    PendingSample,
    SampleChecks,
    SampleSchema,
    collate,
    parse_sample,
)
from scaletrain.data.loader.plan import MASK63, shards_for_slot, shuffle_seed, stable_hash
from scaletrain.data.loader.progress import SourceView
from scaletrain.data.loader.shard_reader import ShardFailure, read_shard_shuffled
from scaletrain.data.loader.validate import read_member_checksums
from scaletrain.data.storage import ReadStats, StorageConfig

logger = logging.getLogger(__name__)

WORKER = "__worker__"
IDS = "__ids__"
EVENTS = "__events__"
IO = "__io__"
NOTES = "__notes__"
# Epochs in a row in which a slot tried a source's shards and could read none: then it gives
# that source up (and with no source left, the slot raises).
MAX_UNREADABLE_EPOCHS = 2


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs (pickled into it)."""

    sources: tuple[SourceView, ...]
    weights: tuple[float, ...]
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
    storage: StorageConfig
    # Global index of this rank's batch number ``first_batch`` (counted from the restore).
    base_batch: int = 0
    first_batch: int = 0
    # The DataLoader asks its workers round-robin from physical worker 0; physical worker p
    # plays logical worker (p + rotation) % W so that a restored rank resumes the round-robin
    # with the worker that was next.
    rotation: int = 0
    # Per-sample validation (issue 14): declared dtype / shape, and per source whether its
    # shards' manifests record member checksums to verify.
    checks: SampleChecks | None = None
    checksummed: tuple[bool, ...] = ()


def choose_source(seed: int, batch: int, weights: tuple[float, ...],
                  unavailable: frozenset[int] = frozenset()) -> int | None:
    """The source of global batch ``batch``: a draw proportional to ``weights`` from a hash of
    (seed, batch), so it depends on nothing but the seed and the samples seen. Sources in
    ``unavailable`` are skipped by a second draw over the others."""
    if len(weights) == 1:
        return None if unavailable else 0
    alive = [i for i in range(len(weights)) if i not in unavailable]
    if not alive:
        return None
    u = stable_hash(seed, "mix", batch) / (MASK63 + 1)
    pick = _weighted(u, weights, range(len(weights)))
    if pick in unavailable:
        u = stable_hash(seed, "mix", batch, "redraw") / (MASK63 + 1)
        pick = _weighted(u, weights, alive)
    return pick


def _weighted(u: float, weights: tuple[float, ...], among) -> int:
    among = list(among)
    x = u * sum(weights[i] for i in among)
    for i in among:
        x -= weights[i]
        if x < 0:
            return i
    return among[-1]


def _loss_event(kind: str, source: int, epoch: int, shard_id: int, positions: list[int],
                reason: str, shard_name: str = "", key: str | None = None) -> dict[str, Any]:
    return {"kind": kind, "source": source, "epoch": epoch, "shard": shard_id,
            "positions": positions, "reason": reason, "shard_name": shard_name, "key": key}


@dataclass
class _Unavailable:
    reason: str


def source_stream(spec: StreamSpec, index: int, worker: int, stats: ReadStats
                  ) -> Iterator[dict[str, Any] | _Unavailable]:
    """Batches (dicts without the bookkeeping keys) and loss events of one source in one slot,
    over its epochs; ends with an _Unavailable when the slot can read none of it."""
    view = spec.sources[index]
    buffers: dict[tuple, list[PendingSample]] = {}
    unreadable_epochs = 0
    for epoch in itertools.count(view.floor):
        shards = view.list_for(epoch)
        if not shards:
            yield _Unavailable(f"source {view.name!r} lists no shard for epoch {epoch}")
            return
        tried = read_any = False
        slot_shards = shards_for_slot(
            view.seed, epoch, len(shards), spec.world_size, spec.num_workers, spec.rank, worker
        )
        for shard_id in slot_shards:
            if view.is_done(epoch, shard_id):
                continue
            tried = True
            consumed = view.consumed_mask(epoch, shard_id)
            name, count = shards[shard_id]
            path = storage.join(view.root, name)
            checksums = None
            if index < len(spec.checksummed) and spec.checksummed[index]:
                try:
                    checksums = read_member_checksums(view.root, name, spec.storage)
                except Exception as exc:  # the shard cannot be verified: not read unverified
                    lost = [p for p in range(count) if not consumed >> p & 1]
                    reason = f"{path}: cannot read its manifest's checksums: {exc}"
                    yield _loss_event("shard_failed", index, epoch, shard_id, lost, reason, name)
                    continue
            items = read_shard_shuffled(
                path, count, spec.shuffle_buffer, shuffle_seed(view.seed, epoch, shard_id),
                spec.storage, stats, view.shard_bytes.get(name), checksums is not None,
            )
            for item in items:
                if isinstance(item, ShardFailure):
                    lost = [p for p in item.unread if not consumed >> p & 1]
                    if lost:
                        reason = f"{path}: {item.reason}"
                        yield _loss_event("shard_failed", index, epoch, shard_id, lost, reason,
                                          name)
                    continue
                read_any = True
                if consumed >> item.position & 1:
                    continue
                try:
                    sample = parse_sample(
                        item.key, item.files, epoch, shard_id, item.position, spec.schema,
                        spec.checks, checksums, item.checksums,
                    )
                except BadSample as exc:
                    reason = f"{path}: {exc}"
                    yield _loss_event("bad_sample", index, epoch, shard_id, [item.position],
                                      reason, name, item.key)
                    continue
                group = buffers.setdefault(sample.group, [])
                group.append(sample)
                if len(group) == spec.batch_size:
                    del buffers[sample.group]
                    yield _batch(group, spec, index)
            # The shard is finished: what is left of it in the buckets waits for other shards.
            for pending in buffers.values():
                for sample in pending:
                    if sample.shard_id == shard_id and sample.epoch == epoch:
                        sample.detach()
        if tried and not read_any:
            unreadable_epochs += 1
            if unreadable_epochs >= MAX_UNREADABLE_EPOCHS:
                yield _Unavailable(
                    f"rank {spec.rank} worker {worker}: none of the shards of source "
                    f"{view.name!r} could be read in {unreadable_epochs} epochs in a row "
                    f"(last: epoch {epoch}, shards {[shards[s][0] for s in slot_shards]}); "
                    "see the loss events logged above"
                )
                return
        elif read_any:
            unreadable_epochs = 0


def slot_stream(spec: StreamSpec, worker: int) -> Iterator[dict[str, Any]]:
    """The batches of one logical worker, forever: each from the source its global index
    draws, carrying the loss events, read counters and notes gathered since the last one."""
    workers = max(1, spec.num_workers)
    stats = ReadStats()
    streams = [source_stream(spec, i, worker, stats) for i in range(len(spec.sources))]
    unavailable: set[int] = set()
    events: list[dict[str, Any]] = []
    notes: list[str] = []  # not yet handed out
    reasons: list[str] = []  # every source given up, for the final error
    k = spec.first_batch + (worker - spec.rotation) % workers
    while True:
        batch_index = spec.base_batch + k * spec.world_size + spec.rank
        batch = None
        while batch is None:
            source = choose_source(spec.seed, batch_index, spec.weights, frozenset(unavailable))
            if source is None:
                raise RuntimeError("; ".join(reasons))
            item = next(streams[source])
            if isinstance(item, _Unavailable):
                unavailable.add(source)
                reasons.append(item.reason)
                if len(unavailable) < len(spec.sources):
                    notes.append(item.reason + "; training goes on with the other sources")
            elif "kind" in item:
                events.append(item)
            else:
                batch = item
        batch[WORKER] = worker
        batch[EVENTS], events = events, []
        batch[NOTES], notes = notes, []
        batch[IO] = stats.take()
        yield batch
        k += workers


def _batch(samples: list[PendingSample], spec: StreamSpec, source: int) -> dict[str, Any]:
    batch = collate(
        samples,
        spec.scaling_factor,
        spec.shift_factor,
        spec.max_text_tokens,
        spec.sample_latents,
    )
    batch[IDS] = [(source, s.epoch, s.shard_id, s.position) for s in samples]
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
