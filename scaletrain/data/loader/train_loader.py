"""The per-rank training loader: a DataLoader over the slot streams, plus the bookkeeping.

The training process records progress when it hands a batch to the trainer, not when a worker
reads it: batches waiting in DataLoader queues are not consumed, so a state taken between
two steps describes exactly what the trainer has seen. See the package docstring for the
exactly-once rule.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from scaletrain.core.config_base import ConfigError
from scaletrain.data.loader.batching import text_context
from scaletrain.data.loader.config import DataConfig
from scaletrain.data.loader.dataset_index import DatasetIndex, load_dataset_index
from scaletrain.data.loader.info import DatasetInfo, dataset_info
from scaletrain.data.loader.plan import num_slots
from scaletrain.data.loader.progress import COUNTER_KEYS, RankProgress
from scaletrain.data.loader.stream import EVENT, IDS, WORKER, LatentShardStream, StreamSpec
from scaletrain.data.loader.synthetic import SyntheticLoader

logger = logging.getLogger(__name__)


class TrainLoader:
    """Iterable of batch dicts for one rank, infinite over epochs (the trainer stops it by
    step count). Each ``iter()`` continues from the current state."""

    def __init__(
        self,
        cfg: DataConfig,
        index: DatasetIndex,
        info: DatasetInfo,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.cfg = cfg
        self.index = index
        self.info = info
        self.rank = rank
        self.world_size = world_size
        self.seed = seed + cfg.seed_offset
        self.workers = max(1, cfg.num_workers)  # logical workers (slots) per rank
        slots = num_slots(world_size, cfg.num_workers)
        if index.num_shards < slots:
            raise ConfigError(
                f"data.num_workers: {index.num_shards} shards in {index.root} cannot feed "
                f"{world_size} ranks x {self.workers} workers (each needs a shard per epoch); "
                "use fewer workers or write smaller shards"
            )
        self._progress = RankProgress(
            self.seed, index.shard_sizes, index.digest, world_size, self.workers, rank
        )
        self._next_worker = 0
        self._base = dict.fromkeys(COUNTER_KEYS, 0)
        self._counters = dict.fromkeys(COUNTER_KEYS, 0)
        self._samples = 0
        self._batches = 0
        self._epoch = 0
        self._active: Iterator | None = None
        self._generation = 0
        self._warned_truncation = False

    # ------------------------------------------------------------------ sizes

    @property
    def samples_per_epoch(self) -> int:
        """Samples in one epoch of the whole dataset (from the index, known in advance)."""
        return self.index.num_samples

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank per epoch (global micro-batches of batch_size * world_size)."""
        return self.samples_per_epoch // (self.cfg.batch_size * self.world_size)

    @property
    def epoch(self) -> int:
        """The highest epoch a sample handed out so far belongs to (the floor before any)."""
        return max(self._epoch, self._progress.floor)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        self._generation += 1
        spec = StreamSpec(
            shard_paths=tuple(str(s.path) for s in self.index.shards),
            shard_sizes=self.index.shard_sizes,
            seed=self.seed,
            world_size=self.world_size,
            num_workers=self.workers,
            rank=self.rank,
            batch_size=self.cfg.batch_size,
            shuffle_buffer=self.cfg.shuffle_buffer,
            max_text_tokens=self.cfg.max_text_tokens,
            sample_latents=self.cfg.sample_latents,
            scaling_factor=self.index.scaling_factor,
            shift_factor=self.index.shift_factor,
            schema=self.info.schema,
            progress=self._progress.view(),
            rotation=self._next_worker,
        )
        extra: dict[str, Any] = {}
        if self.cfg.num_workers > 0:
            extra = {
                "num_workers": self.cfg.num_workers,
                "prefetch_factor": self.cfg.prefetch_factor,
                "timeout": self.cfg.timeout_s,
            }
        pin = self.cfg.pin_memory and torch.cuda.is_available()
        # Its own generator: the DataLoader draws a base seed per iter(), which must not
        # advance the training process's global RNG.
        loader = DataLoader(
            LatentShardStream(spec),
            batch_size=None,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(self.seed),
            **extra,
        )
        self._active = iter(loader)
        return self._consume(self._active, self._generation)

    def _consume(self, items: Iterator, generation: int) -> Iterator[dict[str, Any]]:
        for item in items:
            if generation != self._generation:
                raise RuntimeError("this loader iterator was replaced (new iter() or restore)")
            self._next_worker = (item[WORKER] + 1) % self.workers
            if EVENT in item:
                self._record_loss(item)
                continue
            yield self._record_batch(item)

    def _record_batch(self, item: dict[str, Any]) -> dict[str, Any]:
        # Mark before yielding: once the trainer holds the batch it counts as seen.
        by_shard: dict[tuple[int, int], list[int]] = defaultdict(list)
        for epoch, shard_id, position in item.pop(IDS):
            by_shard[epoch, shard_id].append(position)
        for (epoch, shard_id), positions in by_shard.items():
            self._progress.mark(epoch, shard_id, positions)
        del item[WORKER]
        truncated = item.pop("__truncated__")
        if truncated:
            self._counters["truncated_texts"] += truncated
            if not self._warned_truncation:
                self._warned_truncation = True
                logger.warning(
                    "rank %d: text longer than data.max_text_tokens=%d was truncated (counted in "
                    "metrics()['truncated_texts']; SD3-style data needs CLIP + T5 tokens)",
                    self.rank,
                    self.cfg.max_text_tokens,
                )
        self._samples += len(item["keys"])
        self._batches += 1
        self._epoch = max(self._epoch, *item["epochs"])
        return item

    def _record_loss(self, event: dict[str, Any]) -> None:
        new = self._progress.mark(event["epoch"], event["shard"], event["positions"])
        self._counters["lost_samples"] += new
        if event[EVENT] == "shard_failed":
            self._counters["failed_shards"] += 1
        else:
            self._counters["bad_samples"] += new
        logger.warning(
            "rank %d: epoch %d: %s; skipped, %d samples lost",
            self.rank,
            event["epoch"],
            event["reason"],
            new,
        )

    def close(self) -> None:
        """Stop the worker processes of the current iterator (a new iter() restarts them)."""
        active, self._active = self._active, None
        shutdown = getattr(active, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ state

    def metrics(self) -> dict[str, int]:
        """Counters of this rank (rank 0 also carries the totals restored from a global state):
        lost_samples, failed_shards, bad_samples, truncated_texts; and samples, batches, epoch
        of this process."""
        out = {k: self._base[k] + self._counters[k] for k in COUNTER_KEYS}
        out.update(samples=self._samples, batches=self._batches, epoch=self.epoch)
        return out

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (JSON-ready). Restore it into the same rank and layout, or
        merge every rank's state with merge_states() to restore into any layout."""
        state = self._progress.to_state()
        state["next_worker"] = self._next_worker
        state["metrics"] = {k: self._base[k] + self._counters[k] for k in COUNTER_KEYS}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a rank state (same rank and layout) or a global state (any layout).
        An iterator taken before stops working; call iter() again."""
        self.close()
        self._generation += 1
        self._progress.load(state)
        if state["kind"] == "rank":
            self._next_worker = int(state.get("next_worker", 0)) % self.workers
            base = state.get("metrics", {})
        else:
            layout = state.get("layout", {})
            same = (layout.get("world_size"), layout.get("num_workers")) == (
                self.world_size,
                self.workers,
            )
            self._next_worker = int(layout["next_worker"][self.rank]) if same else 0
            base = state.get("metrics", {}) if self.rank == 0 else {}
        self._base = {k: int(base.get(k, 0)) for k in COUNTER_KEYS}
        self._counters = dict.fromkeys(COUNTER_KEYS, 0)
        self._epoch = self._progress.floor

    # ------------------------------------------------------------------ conditioning

    def empty_conditioning(self) -> dict[str, torch.Tensor] | None:
        """The empty prompt in the batch's text layout (no batch dim), for CFG dropout; None
        when the dataset has no empty_prompt.text.safetensors."""
        if self.info.empty_prompt is None:
            return None
        return text_context(self.info.empty_prompt, self.cfg.max_text_tokens)


def build_train_loader(
    cfg: DataConfig,
    rank: int,
    world_size: int,
    seed: int,
    state: dict[str, Any] | None = None,
    holdout_shards: int = 0,
) -> TrainLoader | SyntheticLoader:
    """The loader of ``rank`` in a world of ``world_size``, continuing from ``state`` (a rank
    state of the same rank and layout, or a global state from merge_states) if given.
    ``data.synthetic.enabled`` gives generated data instead of shards. The last
    ``holdout_shards`` shards (in shard order) are never read: evaluation holds them out
    (``eval.holdout_shards``); they are left out of the index, so of the state's digest too."""
    if cfg.synthetic.enabled:
        loader = SyntheticLoader(cfg.synthetic, cfg.batch_size, rank, world_size,
                                 seed + cfg.seed_offset)
    else:
        if not cfg.path:
            raise ConfigError(
                "data.path: required: the directory of latent shards (with index.json)")
        index = load_dataset_index(cfg.path)
        if holdout_shards > 0:
            if holdout_shards >= index.num_shards:
                raise ConfigError(
                    f"eval.holdout_shards: {holdout_shards} of the {index.num_shards} shards "
                    f"in {index.root} leaves none to train on")
            index = dataclasses.replace(index, shards=index.shards[:-holdout_shards])
        loader = TrainLoader(cfg, index, dataset_info(index), rank, world_size, seed)
    if state is not None:
        loader.load_state_dict(state)
    return loader
