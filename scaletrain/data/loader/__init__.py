"""The training loader over latent shards: deterministic, resumable, rank- and worker-sharded,
bucketed. Full user documentation: docs/data_loader.md.

Public API::

    loader = build_train_loader(cfg: DataConfig, rank, world_size, seed, state=None)
    for batch in loader: ...            # infinite over epochs; the trainer stops by step count
    loader.state_dict() / loader.load_state_dict(state)
    merge_states([state of rank 0, ..., state of rank world-1]) -> global state
    loader.samples_per_epoch, loader.steps_per_epoch, loader.epoch, loader.metrics()
    loader.empty_conditioning()         # the empty prompt in the batch layout (CFG dropout)
    read_dataset_info(path) -> DatasetInfo

Exactly-once rule
-----------------
*Plan.* Epoch e's work is a pure function of (seed, e, shard list, layout): the shards in a
hash-seeded order, dealt round-robin to the ``S = world_size * max(1, num_workers)`` slots
(slot = rank + world_size * worker; position i goes to slot (e*n + i) mod S); each slot reads
its shards in that order, each shard in a seeded shuffled order (seed, e, shard).

*Progress* is recorded in world-independent units: for every unfinished epoch, per shard, the
set of *positions* (a sample's index in the tar's stored order) that are consumed, i.e. were in
a batch handed to the trainer or were lost to a read error. Epochs below a floor are finished.
A rank records a batch when it hands it out, never earlier, so batches still queued in the
DataLoader are not consumed.

*Resume.* A loader reads, for each epoch from its floor on, the shards the plan gives its
slots under the *current* layout, skipping consumed positions. Every shard of an epoch belongs
to exactly one slot in any layout, and a position is skipped iff it was consumed, so every
sample of an epoch is handed out exactly once (or counted lost), whatever the number of ranks
or workers before and after a resume. ``merge_states`` unions the ranks' records (disjoint, as
each rank records only the shards it owns) into a global state that restores into any
(rank, world_size, num_workers); a rank state restores into the same rank and layout.

*Same stream.* With an unchanged layout the resumed stream equals the uninterrupted one:
a slot's batches are consecutive chunks of batch_size of each bucket's subsequence of its
sample sequence; the consumed batches are a prefix of those chunks per bucket, so removing them
leaves the remaining chunks (and their order) intact; the DataLoader's round-robin over
workers is resumed at the worker that was next (the state records it).

*Leftovers (carry rule).* A bucket's samples that do not fill a batch at the end of a slot's
epoch stay in the slot's buffer and complete a batch in its next epoch; nothing is dropped.
A batch may therefore hold samples of two epochs (``batch["epochs"]`` says which), and an
epoch is finished once its last carried sample is handed out.

*Failures.* A shard that cannot be read (missing, truncated, corrupt) delivers the samples
read before the error, then its unread positions are recorded as consumed and counted in
``metrics()["lost_samples"]`` / ``["failed_shards"]`` and logged; a sample that cannot be
decoded likewise (``bad_samples``). Training does not stop.
"""

from scaletrain.data.loader.config import DataConfig
from scaletrain.data.loader.info import DatasetInfo, read_dataset_info
from scaletrain.data.loader.progress import NeedsGlobalState, StateError, merge_states
from scaletrain.data.loader.train_loader import TrainLoader, build_train_loader

__all__ = [
    "DataConfig",
    "DatasetInfo",
    "NeedsGlobalState",
    "StateError",
    "TrainLoader",
    "build_train_loader",
    "merge_states",
    "read_dataset_info",
]
