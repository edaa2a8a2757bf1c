"""The training loader over latent shards: deterministic, resumable, rank- and worker-sharded,
bucketed; one dataset or a weighted mixture, local or in object storage, whose shards may
change between resumes. Full user documentation: docs/data_loader.md.

Public API::

    loader = build_train_loader(cfg: DataConfig, rank, world_size, seed, state=None)
    for batch in loader: ...            # infinite over epochs; the trainer stops by step count
    loader.state_dict() / loader.load_state_dict(state)
    merge_states([state of rank 0, ..., state of rank world-1]) -> global state
    loader.samples_per_epoch, loader.steps_per_epoch, loader.epoch, loader.metrics()
    loader.empty_conditioning()         # the empty prompt in the batch layout (CFG dropout)
    read_dataset_info(path) -> DatasetInfo

Exactly-once rule (per source)
------------------------------
*Plan.* Epoch e of a source is a pure function of (source seed, e, the epoch's shard list,
layout): the shards in a hash-seeded order, dealt round-robin to the
``S = world_size * max(1, num_workers)`` slots (slot = rank + world_size * worker; position i
goes to slot (e*n + i) mod S); each slot reads its shards in that order, each in a seeded
shuffled order.

*Mixture.* Rank r's k-th batch is global batch g = base + k * world_size + r (every DataLoader
item is one batch, asked of the workers round-robin); batch g comes from the source a hash of
(seed, g) draws in proportion to the weights: the same in every layout and across resumes.

*Progress* is recorded in world-independent units: per source, for every unfinished epoch,
per shard, the set of *positions* (a sample's index in the tar's stored order) that are
consumed, i.e. were in a batch handed to the trainer or were lost to a read error. Epochs
below a source's floor are done. A rank records a batch when it hands it out, never earlier.

*Shard lists.* Shards are identified by name; each range of epochs of a source reads a stored
(name, count) list. On resume, started epochs keep theirs minus vanished shards (logged with
their sample counts, or refused with ``data.missing_shards=error``); new shards join at the
source's next epoch (or the epoch in progress with ``data.join_new_shards=now``).

*Resume.* A loader reads, for each epoch from a source's floor on, the shards the plan gives
its slots under the *current* layout, skipping consumed positions. Every shard of an epoch
belongs to exactly one slot in any layout, and a position is skipped iff it was consumed, so
every sample of an epoch is handed out exactly once (or counted lost), whatever the layouts
and shard lists before and after a resume. ``merge_states`` unions the ranks' records into a
global state that restores into any (rank, world_size, num_workers) and shard lists; a rank
state restores into the same rank and layout while no list changed (else NeedsGlobalState).

*Same stream.* With an unchanged layout and shards the resumed stream equals the
uninterrupted one (per source and bucket, the consumed batches are a prefix of a slot's
batches; the round-robin over workers resumes at the worker that was next).

*Leftovers (carry rule).* A bucket's samples that do not fill a batch at the end of a slot's
epoch stay in the slot's buffer and complete a batch in the source's next epoch; nothing is
dropped. A batch may hold samples of two epochs (``batch["epochs"]`` says which).

*Failures.* A shard that cannot be read (missing, truncated, corrupt, a remote read failing
after its retries) delivers the samples read before the error, then its unread positions are
recorded as consumed and counted (``lost_samples``, ``failed_shards``) and logged; a sample
that cannot be decoded likewise (``bad_samples``). A source none of whose shards a slot could
read in two epochs is given up by that slot, which goes on with the others. Training does
not stop.
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
