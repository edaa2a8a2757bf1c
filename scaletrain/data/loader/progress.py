"""Progress through each source's epochs, in units that depend on neither the layout (ranks,
workers) nor the other sources, and that survive shards being added or removed.

The unit is a sample's *position* in its shard: the index of the sample in the tar's stored
order (0 .. count-1, counts from the dataset index). For each source and each of its epochs
not yet finished the progress holds, per shard, the set of positions already *consumed*:
handed to the trainer in a batch, or counted as lost because the shard could not be read. A
shard whose positions are all consumed is *done*. Epochs below the source's ``floor`` are done
entirely and are not stored.

**Shard lists.** Each epoch of a source reads one *shard list* (names and counts, sorted by
name); shard ids are positions in that list. A source keeps its lists as ranges,
``[(from_epoch, list), ...]``: when shards are added or removed between two runs,
:func:`reconcile_source` keeps the epochs already started on their own list (minus the shards
that vanished, whose records are dropped and logged) and gives the full new list to the
epochs after them (``data.join_new_shards=next_epoch``) or to every unfinished epoch
(``now``). Exactly-once holds over the shards present because it rests only on "each shard of
an epoch belongs to one slot in any layout" and "a position is skipped iff consumed", never
on the list staying the same.

A rank records only the shards it owns under its layout (see :mod:`.plan`); :func:`merge_states`
unions the ranks' states into one *global* state (the ranks' records are disjoint), from which
a loader for any (rank, world, workers) is built. A rank state restores only into the same
rank and layout and only while no shard list changed; otherwise :class:`NeedsGlobalState`
asks for the merge (a changed list changes which rank owns which shard).

State dicts are plain JSON-ready data (ints, strings, lists, dicts).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scaletrain.data.loader.plan import shards_for_rank

log = logging.getLogger(__name__)

STATE_FORMAT = "scaletrain.loader.progress/2"
OLD_FORMAT = "scaletrain.loader.progress/1"
# Counters summed over ranks; rank 0 carries the totals restored from a global state.
COUNTER_KEYS = ("lost_samples", "failed_shards", "bad_samples", "truncated_texts",
                "read_retries")
SOURCE_COUNTER_KEYS = ("samples", "lost_samples", "failed_shards", "bad_samples")

ShardList = tuple[tuple[str, int], ...]  # (shard name, sample count), sorted by name


class StateError(ValueError):
    """A loader state does not fit the dataset, seed or layout it is restored into."""


class NeedsGlobalState(StateError):
    """A rank's own state cannot be restored (a shard list changed); restore the global state
    of every rank's states (merge_states) instead. A trainer can catch this and do so."""


def pack_list(shards: ShardList) -> str:
    """A shard list as compact text (zlib + base64 of "name\\tcount" lines)."""
    text = "\n".join(f"{name}\t{count}" for name, count in shards).encode("utf-8")
    return base64.b64encode(zlib.compress(text, 6)).decode("ascii")


def unpack_list(text: str) -> ShardList:
    raw = zlib.decompress(base64.b64decode(text)).decode("utf-8")
    out = []
    for line in raw.split("\n") if raw else []:
        name, count = line.rsplit("\t", 1)
        out.append((name, int(count)))
    return tuple(out)


def list_digest(shards: ShardList) -> str:
    text = "\n".join(f"{name}:{count}" for name, count in shards)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _mask_hex(ids: Iterable[int]) -> str:
    mask = 0
    for i in ids:
        mask |= 1 << i
    return format(mask, "x")


def _hex_ids(text: str) -> set[int]:
    mask = int(text, 16) if text else 0
    out, i = set(), 0
    while mask:
        if mask & 1:
            out.add(i)
        mask >>= 1
        i += 1
    return out


@dataclass
class EpochRecord:
    """Consumed positions of one epoch: shards fully done, and bitmasks of partial shards."""

    done: set[int] = field(default_factory=set)
    partial: dict[int, int] = field(default_factory=dict)  # shard id -> bitmask of positions

    def to_json(self) -> dict[str, Any]:
        return {
            "done": _mask_hex(self.done),
            "partial": {str(sid): format(mask, "x") for sid, mask in sorted(self.partial.items())},
        }

    @staticmethod
    def from_json(data: dict[str, Any], num_shards: int, where: str) -> EpochRecord:
        record = EpochRecord(done=_hex_ids(data.get("done", "")))
        record.partial = {int(s): int(m, 16) for s, m in data.get("partial", {}).items()}
        bad = [s for s in (*record.done, *record.partial) if not 0 <= s < num_shards]
        if bad:
            raise StateError(f"{where}: names shard {bad[0]} of a list of {num_shards}")
        return record

    def merge(self, other: EpochRecord) -> None:
        self.done |= other.done
        for sid, mask in other.partial.items():
            self.partial[sid] = self.partial.get(sid, 0) | mask


@dataclass(frozen=True)
class SourceView:
    """A read-only snapshot of one source handed to the workers: its shards and what to skip."""

    name: str
    root: str
    seed: int
    lists: tuple[tuple[int, ShardList], ...]
    floor: int
    done: dict[int, frozenset[int]]
    partial: dict[int, dict[int, int]]
    shard_bytes: dict[str, int] = field(default_factory=dict)  # known sizes, by name

    def list_for(self, epoch: int) -> ShardList:
        return list_for(self.lists, epoch)

    def is_done(self, epoch: int, shard_id: int) -> bool:
        return epoch < self.floor or shard_id in self.done.get(epoch, ())

    def consumed_mask(self, epoch: int, shard_id: int) -> int:
        return self.partial.get(epoch, {}).get(shard_id, 0)


def list_for(lists: Sequence[tuple[int, ShardList]], epoch: int) -> ShardList:
    """The shard list epoch ``epoch`` reads: the last range starting at or before it."""
    chosen = lists[0][1]
    for start, shards in lists:
        if start <= epoch:
            chosen = shards
    return chosen


class SourceProgress:
    """What one rank has consumed of one source, for the shards it owns under its layout."""

    def __init__(self, name: str, seed: int, lists: list[tuple[int, ShardList]],
                 world_size: int, num_workers: int, rank: int) -> None:
        self.name = name
        self.seed = seed
        self.lists = list(lists)
        self.world_size = world_size
        self.num_workers = num_workers
        self.rank = rank
        self.floor = 0
        self.epochs: dict[int, EpochRecord] = {}

    def list_for(self, epoch: int) -> ShardList:
        return list_for(self.lists, epoch)

    def owned(self, epoch: int) -> frozenset[int]:
        return shards_for_rank(self.seed, epoch, len(self.list_for(epoch)), self.world_size,
                               self.num_workers, self.rank)

    def mark(self, epoch: int, shard_id: int, positions: Iterable[int]) -> int:
        """Record positions as consumed; returns how many were new."""
        if epoch < self.floor:
            raise RuntimeError(f"{self.name}: epoch {epoch} is already complete "
                               f"(floor {self.floor})")
        if shard_id not in self.owned(epoch):
            raise RuntimeError(f"rank {self.rank} consumed shard {shard_id} of {self.name} in "
                               f"epoch {epoch}, which it does not own")
        record = self.epochs.setdefault(epoch, EpochRecord())
        if shard_id in record.done:
            return 0
        mask = before = record.partial.get(shard_id, 0)
        for pos in positions:
            mask |= 1 << pos
        new = mask.bit_count() - before.bit_count()
        if mask.bit_count() == self.list_for(epoch)[shard_id][1]:
            record.partial.pop(shard_id, None)
            record.done.add(shard_id)
            self.advance_floor()
        else:
            record.partial[shard_id] = mask
        return new

    def advance_floor(self) -> None:
        # Only contiguous complete epochs are dropped, so "below floor" always means done. A
        # rank that owns no shard of an epoch (a source with fewer shards than slots) is done
        # with it at once; every slot owns shards again within a few epochs, so this stops.
        while self.list_for(self.floor):
            owned = self.owned(self.floor)
            record = self.epochs.get(self.floor)
            if owned and (record is None or len(record.done & owned) < len(owned)):
                return
            self.epochs.pop(self.floor, None)
            self.floor += 1

    def view(self, root: str, shard_bytes: dict[str, int] | None = None) -> SourceView:
        return SourceView(
            name=self.name, root=root, seed=self.seed, lists=tuple(self.lists),
            floor=self.floor,
            done={e: frozenset(r.done) for e, r in self.epochs.items()},
            partial={e: dict(r.partial) for e, r in self.epochs.items() if r.partial},
            shard_bytes=dict(shard_bytes or {}),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "lists": [[start, pack_list(shards), list_digest(shards)]
                      for start, shards in self.lists],
            "seed": self.seed,
            "floor": self.floor,
            "epochs": {str(e): r.to_json() for e, r in sorted(self.epochs.items())},
        }

    def take(self, saved: SavedSource, only_owned: bool) -> None:
        """Take over reconciled records (all of them, or those of the shards this rank owns)."""
        self.lists, self.floor = list(saved.lists), saved.floor
        self.epochs = {}
        for epoch, record in saved.epochs.items():
            if only_owned:
                owned = self.owned(epoch)
                record = EpochRecord(done=record.done & owned,
                                     partial={s: m for s, m in record.partial.items()
                                              if s in owned})
            if record.done or record.partial:
                self.epochs[epoch] = record
        self.advance_floor()


# --------------------------------------------------------------------------- saved sources


@dataclass
class SavedSource:
    """One source's progress decoded from a state."""

    lists: list[tuple[int, ShardList]]
    floor: int
    epochs: dict[int, EpochRecord]

    @staticmethod
    def from_json(data: dict[str, Any], where: str) -> SavedSource:
        lists = []
        for start, packed, digest in data["lists"]:
            shards = unpack_list(packed)
            if list_digest(shards) != digest:
                raise StateError(f"{where}: a shard list is damaged (digest mismatch)")
            lists.append((int(start), shards))
        epochs = {
            int(e): EpochRecord.from_json(rec, len(list_for(lists, int(e))), f"{where} epoch {e}")
            for e, rec in data.get("epochs", {}).items()
        }
        return SavedSource(lists, int(data["floor"]), epochs)


@dataclass
class Reconciled:
    """A saved source fitted to the shards present now, and what changed."""

    source: SavedSource
    vanished: list[tuple[str, int, int]]  # (name, samples, of which unseen in started epochs)
    changed: list[tuple[str, int, int]]  # (name, saved count, count now)
    added: list[str]
    join_epoch: int

    @property
    def unchanged(self) -> bool:
        return not (self.vanished or self.changed or self.added)


def reconcile_source(saved: SavedSource, current: ShardList, join_now: bool) -> Reconciled:
    """Fit a saved source's progress to its current shard list.

    Epochs from the floor up to the last one with consumed samples (the *started* epochs)
    keep their own list minus vanished shards (or shards whose count changed: their progress
    no longer describes them); later epochs read the current list. With ``join_now`` every
    unfinished epoch reads the current list, so new shards are read in the epoch in progress.
    Records move to the new shard ids by name."""
    now = dict(current)
    in_use = {name: count for start, shards in saved.lists for name, count in shards}
    changed = sorted((n, c, now[n]) for n, c in in_use.items() if n in now and now[n] != c)
    started = sorted(saved.epochs)
    last_started = started[-1] if started else saved.floor - 1
    join = saved.floor if join_now else last_started + 1
    vanished = []
    for name, count in sorted(in_use.items()):
        if name in now:
            continue
        unseen = 0
        for epoch in range(saved.floor, last_started + 1):
            shards = list_for(saved.lists, epoch)
            ids = {n: i for i, (n, _) in enumerate(shards)}
            if name not in ids:
                continue
            record = saved.epochs.get(epoch, EpochRecord())
            sid = ids[name]
            if sid not in record.done:
                unseen += count - record.partial.get(sid, 0).bit_count()
        vanished.append((name, count, unseen))
    gone = {n for n, _, _ in vanished} | {n for n, _, _ in changed}
    lists: list[tuple[int, ShardList]] = []
    epochs: dict[int, EpochRecord] = {}
    for epoch in range(saved.floor, join):
        old = list_for(saved.lists, epoch)
        kept = tuple((n, c) for n, c in old if n not in gone)
        if not lists or lists[-1][1] != kept:
            lists.append((epoch, kept))
        record = saved.epochs.get(epoch)
        if record is not None:
            epochs[epoch] = _remap(record, old, kept)
    if not lists or lists[-1][1] != current:
        lists.append((join, tuple(current)))
    if join_now:  # every unfinished epoch reads the current list: remap its records there
        epochs = {e: _remap(r, list_for(saved.lists, e), current)
                  for e, r in saved.epochs.items() if e >= saved.floor}
    known = set(in_use)
    added = sorted(n for n in now if n not in known or n in {c[0] for c in changed})
    return Reconciled(SavedSource(lists, saved.floor, epochs), vanished, changed, added, join)


def _remap(record: EpochRecord, old: ShardList, new: ShardList) -> EpochRecord:
    new_ids = {name: i for i, (name, _) in enumerate(new)}
    out = EpochRecord()
    for sid in record.done:
        name = old[sid][0]
        if name in new_ids and new[new_ids[name]][1] == old[sid][1]:
            out.done.add(new_ids[name])
    for sid, mask in record.partial.items():
        name = old[sid][0]
        if name in new_ids and new[new_ids[name]][1] == old[sid][1]:
            out.partial[new_ids[name]] = mask
    return out


# --------------------------------------------------------------------------- states


def check_state(state: dict[str, Any], seed: int) -> None:
    """Refuse what is not a loader state of this format, or one taken with another seed."""
    if state.get("format") == OLD_FORMAT:
        raise StateError("a loader state of the first format holds one source; it restores "
                         "into data.path (or data.sources with that one source) only")
    if state.get("format") != STATE_FORMAT:
        raise StateError(
            f"not a loader state (format {state.get('format')!r}, want {STATE_FORMAT})"
        )
    if state["seed"] != seed:
        raise StateError(
            f"the loader state was saved with data seed {state['seed']}, now {seed}; the epoch "
            "plan depends on it, so resuming with another seed would repeat or skip samples"
        )


def upgrade_state(state: dict[str, Any], name: str, shards: ShardList,
                  source_seed: int) -> dict[str, Any]:
    """A state of the first format (one source, shards identified by a digest of the list)
    in this format, when the dataset's shard list is still the one it was saved on."""
    if state.get("format") != OLD_FORMAT:
        return state
    digest = hashlib.sha256("\n".join(f"{n}:{c}" for n, c in shards).encode()).hexdigest()[:16]
    if state["digest"] != digest or state["num_shards"] != len(shards):
        raise StateError(
            f"the loader state (first format) was saved on another shard list "
            f"({state['num_shards']} shards, digest {state['digest']}; now {len(shards)} "
            f"shards, digest {digest}); states of that format hold no shard names, so the "
            "changes cannot be matched"
        )
    epochs = {}
    for e, rec in state["epochs"].items():
        record = EpochRecord(done={int(s) for s in rec.get("done", [])})
        record.partial = {int(s): int(m, 16) for s, (_, m) in rec.get("partial", {}).items()}
        epochs[e] = record.to_json()
    source = {"lists": [[0, pack_list(shards), list_digest(shards)]], "seed": source_seed,
              "floor": int(state["floor"]), "epochs": epochs}
    out = {k: v for k, v in state.items() if k not in ("num_shards", "digest", "epochs",
                                                         "floor")}
    out.update(format=STATE_FORMAT, sources={name: source}, batches={"base": 0, "taken": 0})
    return out


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Union every rank's state (all ranks of one layout, each once) into a global state.

    Global states (world-independent already) are returned as is when every rank saved the
    same one, so a trainer may call this on whatever it saved. The result restores into any
    (rank, world_size, num_workers) and into a dataset whose shards changed since.
    """
    if not states:
        raise StateError("merge_states needs at least one state")
    kinds = {s.get("kind") for s in states}
    if kinds == {"global"}:
        if any(s != states[0] for s in states[1:]):
            raise StateError("merge_states: the ranks saved different global states")
        return states[0]
    if kinds != {"rank"}:
        raise StateError("merge_states takes the per-rank states of one run (state_dict() of each)")
    if {s.get("format") for s in states} != {STATE_FORMAT}:
        raise StateError(f"merge_states: not loader states of format {STATE_FORMAT}")
    first = states[0]
    seed, world, workers = first["seed"], first["world_size"], first["num_workers"]
    for s in states:
        check_state(s, seed)
    if any((s["world_size"], s["num_workers"]) != (world, workers) for s in states):
        raise StateError("merge_states: the states come from different (world_size, num_workers)")
    ranks = sorted(s["rank"] for s in states)
    if ranks != list(range(world)):
        raise StateError(
            f"merge_states needs exactly one state per rank 0..{world - 1}, got ranks {ranks}"
        )
    by_rank = sorted(states, key=lambda s: s["rank"])
    if any(set(s["sources"]) != set(first["sources"]) for s in by_rank):
        raise StateError("merge_states: the ranks' states name different sources")
    sources = {}
    for name in first["sources"]:
        sources[name] = _merge_source(name, [s["sources"][name] for s in by_rank], world, workers)
    metrics = {k: sum(int(s.get("metrics", {}).get(k, 0)) for s in by_rank) for k in COUNTER_KEYS}
    per_source = {
        name: {k: sum(int(s.get("source_metrics", {}).get(name, {}).get(k, 0)) for s in by_rank)
               for k in SOURCE_COUNTER_KEYS}
        for name in first["sources"]
    }
    base = int(first["batches"]["base"])
    if any(int(s["batches"]["base"]) != base for s in by_rank):
        raise StateError("merge_states: the ranks' states were restored at different points")
    return {
        "format": STATE_FORMAT,
        "kind": "global",
        "seed": seed,
        "sources": sources,
        # Global batch index of the next batch: every rank took one batch per step.
        "batches": {"base": base + sum(int(s["batches"]["taken"]) for s in by_rank), "taken": 0},
        "layout": {
            "world_size": world,
            "num_workers": workers,
            "next_worker": [int(s.get("next_worker", 0)) for s in by_rank],
        },
        "metrics": metrics,
        "source_metrics": per_source,
        # Every rank's bad samples (issue 14): each rank restores all, so none is named twice.
        "quarantine": {k: v for s in by_rank for k, v in s.get("quarantine", {}).items()},
    }


def _merge_source(name: str, parts: list[dict[str, Any]], world: int, workers: int
                  ) -> dict[str, Any]:
    if any(p["lists"] != parts[0]["lists"] or p["seed"] != parts[0]["seed"] for p in parts):
        raise StateError(f"merge_states: the ranks' states of source {name!r} read different "
                         "shard lists")
    decoded = [SavedSource.from_json(p, f"source {name!r} rank {r}") for r, p in enumerate(parts)]
    lists, seed = decoded[0].lists, int(parts[0]["seed"])
    floors = [d.floor for d in decoded]
    floor = min(floors)
    last = max([max(floors) - 1] + [e for d in decoded for e in d.epochs])
    merged = SourceProgress(name, seed, lists, world, workers, 0)
    merged.floor = floor
    for epoch in range(floor, last + 1):
        n = len(list_for(lists, epoch))
        record = EpochRecord()
        for rank, d in enumerate(decoded):
            if epoch < d.floor:
                record.done |= shards_for_rank(seed, epoch, n, world, workers, rank)
            elif epoch in d.epochs:
                record.merge(d.epochs[epoch])
        shards = list_for(lists, epoch)
        for sid in list(record.partial):
            if sid in record.done or record.partial[sid].bit_count() == shards[sid][1]:
                record.done.add(sid)
                del record.partial[sid]
        merged.epochs[epoch] = record
    while merged.floor in merged.epochs and len(merged.epochs[merged.floor].done) == len(
            list_for(lists, merged.floor)):
        del merged.epochs[merged.floor]
        merged.floor += 1
    merged.epochs = {e: r for e, r in merged.epochs.items() if r.done or r.partial}
    return merged.to_json()
