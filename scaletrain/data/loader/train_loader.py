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
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from scaletrain.core.config_base import ConfigError
from scaletrain.core.signals import ignore_stop_signals
from scaletrain.data.loader.batching import SampleChecks, text_context
from scaletrain.data.loader.config import DataConfig, SourceConfig
from scaletrain.data.loader.dataset_index import DatasetIndex, load_dataset_index
from scaletrain.data.loader.info import DatasetInfo, NoReadableSample, dataset_info
from scaletrain.data.loader.plan import MASK63, num_slots, stable_hash
from scaletrain.data.loader.progress import (
    COUNTER_KEYS,
    SOURCE_COUNTER_KEYS,
    STATE_FORMAT,
    NeedsGlobalState,
    SavedSource,
    SourceProgress,
    StateError,
    check_state,
    reconcile_source,
    upgrade_state,
)
from scaletrain.data.loader.stream import (
    EVENTS,
    IDS,
    IO,
    NOTES,
    WORKER,
    LatentShardStream,
    StreamSpec,
)
from scaletrain.data.loader.synthetic import SyntheticLoader
from scaletrain.data.shard_format import MEMBER_CHECKSUMS

logger = logging.getLogger(__name__)


@dataclass
class Source:
    """One configured source, its index and its progress on this rank."""

    key: str  # dotted config key, for messages
    cfg: SourceConfig
    index: DatasetIndex
    progress: SourceProgress

    @property
    def name(self) -> str:
        return self.cfg.name


def source_seed(seed: int, name: str, single: bool) -> int:
    """The seed of a source's plan: the loader's own for a single source (the plan of a
    one-source run is the one it always was), else a hash of it with the source's name.
    Fixed when a source first appears: a resume reads it from the state."""
    return seed if single else stable_hash(seed, "source", name) & MASK63


class TrainLoader:
    """Iterable of batch dicts for one rank, infinite over epochs (the trainer stops it by
    step count). Each ``iter()`` continues from the current state."""

    def __init__(
        self,
        cfg: DataConfig,
        indexes: list[tuple[str, SourceConfig, DatasetIndex]],
        info: DatasetInfo,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.cfg = cfg
        self.info = info
        self.rank = rank
        self.world_size = world_size
        self.seed = seed + cfg.seed_offset
        self.workers = max(1, cfg.num_workers)  # logical workers (slots) per rank
        single = len(indexes) == 1
        self.sources = [
            Source(key, scfg, index, SourceProgress(
                scfg.name, source_seed(self.seed, scfg.name, single),
                [(0, index.shard_list)], world_size, self.workers, rank))
            for key, scfg, index in indexes
        ]
        slots = num_slots(world_size, cfg.num_workers)
        for source in self.sources:
            if source.index.num_shards < slots and rank == 0:
                # Correct (every shard still belongs to one slot per epoch), but the source's
                # epochs drift apart between slots: a slot reads it every few epochs.
                logger.warning(
                    "%s: %d shards for %d reading slots (%d ranks x %d workers): some slots "
                    "read none of it in an epoch; write smaller shards or use fewer workers "
                    "to keep its epochs in step", source.key, source.index.num_shards, slots,
                    world_size, self.workers)
        self._next_worker = 0
        self._base_batch = 0  # global index of this rank's batch 0 (since the restore)
        self._taken = 0  # batches handed out since the restore
        self._base = dict.fromkeys(COUNTER_KEYS, 0)
        self._counters = dict.fromkeys(COUNTER_KEYS, 0)
        self._source_base = {s.name: dict.fromkeys(SOURCE_COUNTER_KEYS, 0) for s in self.sources}
        self._source_counters = {s.name: dict.fromkeys(SOURCE_COUNTER_KEYS, 0)
                                 for s in self.sources}
        self._source_epoch = {s.name: 0 for s in self.sources}
        self._samples = 0
        self._active: Iterator | None = None
        self._generation = 0
        self._warned: set[str] = set()
        # Samples found bad (issue 14), named once each: "source/shard/key" -> reason. Kept in
        # the state, so that a resumed run does not name them again.
        self._quarantine: dict[str, str] = {}
        for source in self.sources:
            if not source.index.raw.get(MEMBER_CHECKSUMS):
                self._log_rank0(logging.INFO, "%s (%s): written without per-member checksums; "
                                "its samples are read unverified (rerun `scaletrain preprocess` "
                                "into a fresh directory to add them)", source.key,
                                source.cfg.path)

    # ------------------------------------------------------------------ sizes

    @property
    def samples_per_epoch(self) -> int:
        """Samples in one epoch of every source together (from the indexes, known in
        advance); in a mixture each source runs through its epochs at its own pace."""
        return sum(s.index.num_samples for s in self.sources)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank per epoch (global micro-batches of batch_size * world_size)."""
        return self.samples_per_epoch // (self.cfg.batch_size * self.world_size)

    @property
    def epoch(self) -> int:
        """The highest epoch a sample handed out so far belongs to (the floor before any), of
        the first source."""
        first = self.sources[0]
        return max(self._source_epoch[first.name], first.progress.floor)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        self._generation += 1
        spec = StreamSpec(
            sources=tuple(s.progress.view(s.index.root, s.index.shard_bytes)
                          for s in self.sources),
            weights=tuple(s.cfg.weight for s in self.sources),
            seed=self.seed,
            world_size=self.world_size,
            num_workers=self.workers,
            rank=self.rank,
            batch_size=self.cfg.batch_size,
            shuffle_buffer=self.cfg.shuffle_buffer,
            max_text_tokens=self.cfg.max_text_tokens,
            sample_latents=self.cfg.sample_latents,
            scaling_factor=self.info.scaling_factor,
            shift_factor=self.info.shift_factor,
            schema=self.info.schema,
            storage=self.cfg.storage,
            base_batch=self._base_batch,
            first_batch=self._taken,
            rotation=self._next_worker,
            checks=SampleChecks(self.info.latent_dtype, self.info.latent_downsample),
            checksummed=tuple(bool(s.index.raw.get(MEMBER_CHECKSUMS)) for s in self.sources),
        )
        extra: dict[str, Any] = {}
        if self.cfg.num_workers > 0:
            extra = {
                "num_workers": self.cfg.num_workers,
                "prefetch_factor": self.cfg.prefetch_factor,
                "timeout": self.cfg.timeout_s,
                # SIGTERM/SIGINT to the whole job must reach the trainer, not kill a worker.
                "worker_init_fn": ignore_stop_signals,
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
            yield self._record_batch(item)

    def _record_batch(self, item: dict[str, Any]) -> dict[str, Any]:
        # Mark before yielding: once the trainer holds the batch it counts as seen.
        self._next_worker = (item.pop(WORKER) + 1) % self.workers
        self._taken += 1
        for event in item.pop(EVENTS):
            self._record_loss(event)
        self._counters["read_retries"] += item.pop(IO)["read_retries"]
        for note in item.pop(NOTES):
            self._warn_once(note)
        by_shard: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for source, epoch, shard_id, position in item.pop(IDS):
            by_shard[source, epoch, shard_id].append(position)
        for (source, epoch, shard_id), positions in by_shard.items():
            src = self.sources[source]
            src.progress.mark(epoch, shard_id, positions)
            self._source_counters[src.name]["samples"] += len(positions)
            self._source_epoch[src.name] = max(self._source_epoch[src.name], epoch)
        truncated = item.pop("__truncated__")
        if truncated:
            self._counters["truncated_texts"] += truncated
            self._warn_once(
                f"rank {self.rank}: text longer than data.max_text_tokens="
                f"{self.cfg.max_text_tokens} was truncated (counted in metrics()"
                "['truncated_texts']; SD3-style data needs CLIP + T5 tokens)")
        self._samples += len(item["keys"])
        return item

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("%s", message)

    def _record_loss(self, event: dict[str, Any]) -> None:
        src = self.sources[event["source"]]
        new = src.progress.mark(event["epoch"], event["shard"], event["positions"])
        counters = self._source_counters[src.name]
        self._counters["lost_samples"] += new
        counters["lost_samples"] += new
        if event["kind"] == "shard_failed":
            self._counters["failed_shards"] += 1
            counters["failed_shards"] += 1
            # Recorded with the bad samples (a whole shard: no key); logged each epoch.
            self._quarantine.setdefault(f"{src.name}/{event.get('shard_name', '')}",
                                        event["reason"])
        else:
            self._counters["bad_samples"] += new
            counters["bad_samples"] += new
            where = f"{src.name}/{event.get('shard_name', '')}/{event.get('key')}"
            if where in self._quarantine:
                return  # named when first found; counted again in each epoch that meets it
            self._quarantine[where] = event["reason"]
        logger.warning(
            "rank %d: %s epoch %d: %s; skipped, %d samples lost",
            self.rank,
            src.key,
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
        lost_samples, failed_shards, bad_samples, truncated_texts, read_retries; samples,
        batches, epoch of this process; and in a mixture ``source/<name>/<counter>`` with
        samples (the run's total, like the loss counters), epoch, lost_samples,
        failed_shards, bad_samples of each source."""
        out: dict[str, int] = {k: self._base[k] + self._counters[k] for k in COUNTER_KEYS}
        out.update(samples=self._samples, batches=self._taken, epoch=self.epoch)
        if len(self.sources) > 1:
            for s in self.sources:
                for k, v in self._source_totals(s.name).items():
                    out[f"source/{s.name}/{k}"] = v
                out[f"source/{s.name}/epoch"] = max(self._source_epoch[s.name], s.progress.floor)
        return out

    def quarantined(self) -> dict[str, str]:
        """Samples this rank found bad so far (with those of a restored state): "source/shard/
        key" -> reason."""
        return dict(self._quarantine)

    def _source_totals(self, name: str) -> dict[str, int]:
        return {k: self._source_base[name][k] + self._source_counters[name][k]
                for k in SOURCE_COUNTER_KEYS}

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (JSON-ready). Restore it into the same rank and layout, or
        merge every rank's state with merge_states() to restore into any layout."""
        return {
            "format": STATE_FORMAT,
            "kind": "rank",
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": self.workers,
            "rank": self.rank,
            "sources": {s.name: {**s.progress.to_json(), "path": s.cfg.path}
                        for s in self.sources},
            "batches": {"base": self._base_batch, "taken": self._taken},
            "next_worker": self._next_worker,
            "metrics": {k: self._base[k] + self._counters[k] for k in COUNTER_KEYS},
            "source_metrics": {s.name: self._source_totals(s.name) for s in self.sources},
            "quarantine": dict(self._quarantine),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a rank state (same rank and layout, unchanged shards) or a global
        state (any layout; shards may have been added or removed). An iterator taken before
        stops working; call iter() again."""
        self.close()
        self._generation += 1
        if len(self.sources) == 1:
            first = self.sources[0]
            state = upgrade_state(state, first.name, first.index.shard_list, first.progress.seed)
        check_state(state, self.seed)
        kind = state["kind"]
        if kind not in ("rank", "global"):
            raise StateError(f"unknown loader state kind {kind!r}")
        if kind == "rank":
            layout = (state["rank"], state["world_size"], state["num_workers"])
            if layout != (self.rank, self.world_size, self.workers):
                raise StateError(
                    f"this is the state of rank {layout[0]} of {layout[1]} with {layout[2]} "
                    f"workers; restoring rank {self.rank} of {self.world_size} with "
                    f"{self.workers} workers needs the global state: merge_states() over "
                    "every rank's state"
                )
        fitted = {}
        for source in self.sources:
            saved = state["sources"].get(source.name)
            if saved is None:
                self._log_rank0(logging.INFO, "%s: a new source %r; it starts at epoch 0",
                                source.key, source.name)
                continue
            fitted[source.name] = self._fit(source, saved, kind)
        dropped = sorted(set(state["sources"]) - {s.name for s in self.sources})
        if dropped:
            self._log_rank0(logging.WARNING, "the loader state has sources %s that data.sources "
                            "no longer names; their progress is dropped", dropped)
        for source in self.sources:
            if source.name in fitted:
                source.progress.seed = int(state["sources"][source.name]["seed"])
                source.progress.take(fitted[source.name], only_owned=kind == "global")
        same = kind == "rank"
        if kind == "global":
            layout = state.get("layout", {})
            same = (layout.get("world_size"), layout.get("num_workers")) == (
                self.world_size, self.workers)
        if kind == "rank":
            self._next_worker = int(state.get("next_worker", 0)) % self.workers
            self._base_batch = int(state["batches"]["base"])
            self._taken = int(state["batches"]["taken"])
        else:
            self._next_worker = int(state["layout"]["next_worker"][self.rank]) if same else 0
            self._base_batch = int(state["batches"]["base"])
            self._taken = 0
        carries = kind == "rank" or self.rank == 0  # a global state's totals go to rank 0
        base = state.get("metrics", {}) if carries else {}
        self._base = {k: int(base.get(k, 0)) for k in COUNTER_KEYS}
        self._counters = dict.fromkeys(COUNTER_KEYS, 0)
        self._quarantine = {str(k): str(v) for k, v in state.get("quarantine", {}).items()}
        saved_sources = state.get("source_metrics", {}) if carries else {}
        for s in self.sources:
            saved = saved_sources.get(s.name, {})
            self._source_base[s.name] = {k: int(saved.get(k, 0)) for k in SOURCE_COUNTER_KEYS}
            self._source_counters[s.name] = dict.fromkeys(SOURCE_COUNTER_KEYS, 0)
            self._source_epoch[s.name] = s.progress.floor

    def _fit(self, source: Source, saved: dict[str, Any], kind: str) -> SavedSource:
        """A saved source fitted to its shards now; logs (or refuses) what changed."""
        decoded = SavedSource.from_json(saved, f"loader state of {source.key}")
        result = reconcile_source(decoded, source.index.shard_list,
                                  self.cfg.join_new_shards == "now")
        if result.unchanged:
            return result.source
        if kind == "rank":
            # Which rank owns which shard depends on the shard list: only the union of every
            # rank's records can be re-dealt.
            raise NeedsGlobalState(
                f"{source.key}: its shard list changed since the checkpoint; restore the "
                "global state (merge_states over every rank's state)")
        lines = [f"{name} ({count} samples, {unseen} of them not yet read in the epoch in "
                 "progress)" for name, count, unseen in result.vanished]
        lines += [f"{name} (rewritten: {old} -> {new} samples; its progress is dropped)"
                  for name, old, new in result.changed]
        if lines and self.cfg.missing_shards == "error":
            raise StateError(
                f"data.missing_shards=error: {source.key} ({source.cfg.path}) lost "
                f"{len(lines)} shards since the checkpoint: {'; '.join(lines[:10])}"
                f"{' ...' if len(lines) > 10 else ''}"
            )
        if lines:
            self._log_rank0(logging.WARNING, "%s (%s): %d shards vanished since the checkpoint, "
                            "training goes on without them: %s", source.key, source.cfg.path,
                            len(lines), "; ".join(lines))
        if result.added:
            when = ("now, in the epoch in progress" if self.cfg.join_new_shards == "now"
                    else f"at its epoch {result.join_epoch}")
            self._log_rank0(logging.WARNING, "%s (%s): %d new shards join %s (%s%s)",
                            source.key, source.cfg.path, len(result.added), when,
                            ", ".join(result.added[:5]), " ..." if len(result.added) > 5 else "")
        return result.source

    def _log_rank0(self, level: int, message: str, *args) -> None:
        if self.rank == 0:
            logger.log(level, message, *args)

    # ------------------------------------------------------------------ conditioning

    def empty_conditioning(self) -> dict[str, torch.Tensor] | None:
        """The empty prompt in the batch's text layout (no batch dim), for CFG dropout; None
        when the dataset has no empty_prompt.text.safetensors."""
        if self.info.empty_prompt is None:
            return None
        return text_context(self.info.empty_prompt, self.cfg.max_text_tokens)


def _mixture_info(indexes: list[tuple[str, SourceConfig, DatasetIndex]],
                  cfg: DataConfig) -> DatasetInfo:
    """The dataset facts of the first readable source, checked against the others: a mixture
    shares one latent space and one text layout. A source with no readable sample is allowed
    in a mixture (training goes on with the others, and says so)."""
    infos: list[tuple[str, DatasetInfo]] = []
    for key, _, index in indexes:
        try:
            infos.append((key, dataset_info(index, cfg.storage)))
        except NoReadableSample as exc:
            if len(indexes) == 1:
                raise
            logger.warning("%s: %s; training starts with the other sources", key, exc)
    if not infos:
        raise ValueError("no source of data.sources has a readable sample")
    key0, first = infos[0]
    for key, info in infos[1:]:
        for what in ("scaling_factor", "shift_factor", "schema"):
            if getattr(info, what) != getattr(first, what):
                raise ConfigError(
                    f"{key}.path: {what} {getattr(info, what)} differs from {key0}'s "
                    f"{getattr(first, what)}; the sources of a mixture must share one latent "
                    "space and text layout (same encoders)")
    return first


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
        indexes = []
        for key, scfg in cfg.resolved_sources():
            index = load_dataset_index(scfg.path, cfg.storage, f"{key}.path")
            if holdout_shards > 0:
                index = _hold_out(index, holdout_shards, key)
            indexes.append((key, scfg, index))
        loader = TrainLoader(cfg, indexes, _mixture_info(indexes, cfg), rank, world_size, seed)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def _hold_out(index: DatasetIndex, holdout_shards: int, key: str) -> DatasetIndex:
    """``index`` without its last ``holdout_shards`` shards (evaluation's held-out set)."""
    if key != "data":
        raise ConfigError("eval.holdout_shards: holds out the last shards of data.path; with "
                          "data.sources give the held-out shards as eval.data")
    if holdout_shards >= index.num_shards:
        raise ConfigError(f"eval.holdout_shards: {holdout_shards} of the {index.num_shards} "
                          f"shards in {index.root} leaves none to train on")
    return dataclasses.replace(index, shards=index.shards[:-holdout_shards])
