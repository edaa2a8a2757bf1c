"""Progress through the epochs, in units that do not depend on the number of ranks or workers.

The unit is a sample's *position* in its shard: the index of the sample in the tar's stored
order (0 .. count-1, counts from the dataset index). For each epoch not yet finished the
progress holds, per shard, the set of positions already *consumed*: handed to the trainer in a
batch, or counted as lost because the shard could not be read. A shard whose positions are all
consumed is *done*. Epochs below ``floor`` are done entirely and are not stored; epochs above
the highest stored one are untouched.

A rank records only the shards it owns under its layout (see :mod:`.plan`), so a rank's state
stays small; :func:`merge_states` unions the ranks' states into one *global* state (the ranks'
records are disjoint because each shard of an epoch belongs to exactly one rank), from which a
loader for any (rank, world) is built: it takes the records of the shards it now owns and reads
only their unconsumed positions.

State dicts are plain JSON-ready data (ints, strings, lists, dicts) so that a trainer can
save them with torch.save, json, or all-gather them as Python objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scaletrain.data.loader.plan import shards_for_rank

STATE_FORMAT = "scaletrain.loader.progress/1"
COUNTER_KEYS = ("lost_samples", "failed_shards", "bad_samples", "truncated_texts")


@dataclass
class EpochRecord:
    """Consumed positions of one epoch: shards fully done, and bitmasks of partial shards."""

    done: set[int] = field(default_factory=set)
    partial: dict[int, int] = field(default_factory=dict)  # shard id -> bitmask of positions

    def to_json(self, sizes: Sequence[int]) -> dict[str, Any]:
        return {
            "done": sorted(self.done),
            "partial": {
                str(sid): [sizes[sid], format(mask, "x")]
                for sid, mask in sorted(self.partial.items())
            },
        }


@dataclass(frozen=True)
class ProgressView:
    """A read-only snapshot handed to the workers: what they must skip."""

    floor: int
    done: dict[int, frozenset[int]]
    partial: dict[int, dict[int, int]]

    def is_done(self, epoch: int, shard_id: int) -> bool:
        return epoch < self.floor or shard_id in self.done.get(epoch, ())

    def consumed_mask(self, epoch: int, shard_id: int) -> int:
        return self.partial.get(epoch, {}).get(shard_id, 0)


class StateError(ValueError):
    """A loader state does not fit the dataset, seed or layout it is restored into."""


def _decode_epochs(
    epochs: dict[str, Any], num_shards: int, sizes: Sequence[int] | None, where: str
) -> dict[int, EpochRecord]:
    out: dict[int, EpochRecord] = {}
    for e_text, rec in epochs.items():
        epoch = int(e_text)
        record = EpochRecord(done={int(s) for s in rec.get("done", [])})
        for sid_text, (size, hex_mask) in rec.get("partial", {}).items():
            sid = int(sid_text)
            if not 0 <= sid < num_shards:
                raise StateError(f"{where}: epoch {epoch} names shard {sid} of {num_shards}")
            if sizes is not None and size != sizes[sid]:
                raise StateError(
                    f"{where}: shard {sid} had {size} samples when saved, the index says "
                    f"{sizes[sid]}"
                )
            record.partial[sid] = int(hex_mask, 16)
        bad = [s for s in record.done if not 0 <= s < num_shards]
        if bad:
            raise StateError(f"{where}: epoch {epoch} names shard {bad[0]} of {num_shards}")
        out[epoch] = record
    return out


def check_compatible(state: dict[str, Any], seed: int, num_shards: int, digest: str) -> None:
    """Refuse a state taken on another dataset or with another seed (exactly-once would break)."""
    if state.get("format") != STATE_FORMAT:
        raise StateError(
            f"not a loader state (format {state.get('format')!r}, want {STATE_FORMAT})"
        )
    if state["digest"] != digest or state["num_shards"] != num_shards:
        raise StateError(
            f"the loader state was saved on another shard list ({state['num_shards']} shards, "
            f"digest {state['digest']}; now {num_shards} shards, digest {digest}); resuming would "
            "repeat or skip samples"
        )
    if state["seed"] != seed:
        raise StateError(
            f"the loader state was saved with data seed {state['seed']}, now {seed}; the epoch "
            "plan depends on it, so resuming with another seed would repeat or skip samples"
        )


class RankProgress:
    """What one rank has consumed, for the shards it owns under its (world, workers) layout."""

    def __init__(
        self,
        seed: int,
        shard_sizes: Sequence[int],
        digest: str,
        world_size: int,
        num_workers: int,
        rank: int,
    ) -> None:
        self.seed = seed
        self.sizes = tuple(shard_sizes)
        self.digest = digest
        self.world_size = world_size
        self.num_workers = num_workers
        self.rank = rank
        if len(self.sizes) < world_size * max(1, num_workers):
            # Every slot must own a shard in every epoch, or "its part of the epoch is done"
            # would hold vacuously and the floor could not be trusted.
            raise ValueError(
                f"{len(self.sizes)} shards cannot feed {world_size} ranks x "
                f"{max(1, num_workers)} workers; write more shards or use fewer workers"
            )
        self.floor = 0
        self.epochs: dict[int, EpochRecord] = {}

    @property
    def num_shards(self) -> int:
        return len(self.sizes)

    def owned(self, epoch: int) -> frozenset[int]:
        return shards_for_rank(
            self.seed, epoch, self.num_shards, self.world_size, self.num_workers, self.rank
        )

    def is_done(self, epoch: int, shard_id: int) -> bool:
        if epoch < self.floor:
            return True
        record = self.epochs.get(epoch)
        return record is not None and shard_id in record.done

    def mark(self, epoch: int, shard_id: int, positions: Iterable[int]) -> int:
        """Record positions as consumed; returns how many were new."""
        if epoch < self.floor:
            raise RuntimeError(f"epoch {epoch} is already complete (floor {self.floor})")
        if shard_id not in self.owned(epoch):
            raise RuntimeError(
                f"rank {self.rank} consumed shard {shard_id} of epoch {epoch}, which it does not own"
            )
        record = self.epochs.setdefault(epoch, EpochRecord())
        if shard_id in record.done:
            return 0
        mask = before = record.partial.get(shard_id, 0)
        for pos in positions:
            mask |= 1 << pos
        new = mask.bit_count() - before.bit_count()
        if mask.bit_count() == self.sizes[shard_id]:
            record.partial.pop(shard_id, None)
            record.done.add(shard_id)
            self._advance_floor()
        else:
            record.partial[shard_id] = mask
        return new

    def _advance_floor(self) -> None:
        # Only contiguous complete epochs are dropped, so "below floor" always means done.
        while True:
            record = self.epochs.get(self.floor)
            if record is None or len(record.done) < len(self.owned(self.floor)):
                return
            self.epochs.pop(self.floor, None)
            self.floor += 1

    def view(self) -> ProgressView:
        return ProgressView(
            floor=self.floor,
            done={e: frozenset(r.done) for e, r in self.epochs.items()},
            partial={e: dict(r.partial) for e, r in self.epochs.items() if r.partial},
        )

    # ------------------------------------------------------------------ state

    def to_state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "kind": "rank",
            "seed": self.seed,
            "num_shards": self.num_shards,
            "digest": self.digest,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "rank": self.rank,
            "floor": self.floor,
            "epochs": {str(e): r.to_json(self.sizes) for e, r in sorted(self.epochs.items())},
        }

    def load(self, state: dict[str, Any]) -> None:
        """Take over a rank state of this very rank and layout, or the relevant part of a
        global state (any layout)."""
        check_compatible(state, self.seed, self.num_shards, self.digest)
        epochs = _decode_epochs(state["epochs"], self.num_shards, self.sizes, "loader state")
        if state["kind"] == "rank":
            same = (state["rank"], state["world_size"], state["num_workers"]) == (
                self.rank,
                self.world_size,
                self.num_workers,
            )
            if not same:
                raise StateError(
                    f"this is the state of rank {state['rank']} of {state['world_size']} with "
                    f"{state['num_workers']} workers; restoring rank {self.rank} of "
                    f"{self.world_size} with {self.num_workers} workers needs the global state: "
                    "merge_states() over every rank's state"
                )
            self.floor = int(state["floor"])
            self.epochs = epochs
        elif state["kind"] == "global":
            self.floor = int(state["floor"])
            self.epochs = {}
            for epoch, record in epochs.items():
                owned = self.owned(epoch)
                mine = EpochRecord(
                    done=record.done & owned,
                    partial={s: m for s, m in record.partial.items() if s in owned},
                )
                if mine.done or mine.partial:
                    self.epochs[epoch] = mine
        else:
            raise StateError(f"unknown loader state kind {state['kind']!r}")
        self._advance_floor()


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Union every rank's state (all ranks of one layout, each once) into a global state.

    Global states (world-independent already) are returned as is when every rank saved the
    same one, so a trainer may call this on whatever it saved. The result restores into any
    (rank, world_size, num_workers).
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
    first = states[0]
    for s in states:
        check_compatible(s, first["seed"], first["num_shards"], first["digest"])
    world, workers = first["world_size"], first["num_workers"]
    if any((s["world_size"], s["num_workers"]) != (world, workers) for s in states):
        raise StateError("merge_states: the states come from different (world_size, num_workers)")
    ranks = sorted(s["rank"] for s in states)
    if ranks != list(range(world)):
        raise StateError(
            f"merge_states needs exactly one state per rank 0..{world - 1}, got ranks {ranks}"
        )
    seed, num_shards = first["seed"], first["num_shards"]
    by_rank = sorted(states, key=lambda s: s["rank"])
    decoded = [_decode_epochs(s["epochs"], num_shards, None, f"rank {s['rank']}") for s in by_rank]
    sizes: dict[int, int] = {}
    for s in by_rank:
        for rec in s["epochs"].values():
            for sid_text, (size, _) in rec.get("partial", {}).items():
                sizes[int(sid_text)] = size

    floors = [int(s["floor"]) for s in by_rank]
    floor = min(floors)
    last = max([max(floors) - 1] + [e for d in decoded for e in d])
    merged: dict[int, EpochRecord] = {}
    for epoch in range(floor, last + 1):
        record = EpochRecord()
        for rank, (rank_floor, epochs) in enumerate(zip(floors, decoded)):
            if epoch < rank_floor:
                record.done |= shards_for_rank(seed, epoch, num_shards, world, workers, rank)
                continue
            rank_record = epochs.get(epoch)
            if rank_record is None:
                continue
            record.done |= rank_record.done
            for sid, mask in rank_record.partial.items():
                record.partial[sid] = record.partial.get(sid, 0) | mask
        for sid in list(record.partial):
            if sid in record.done or record.partial[sid].bit_count() == sizes[sid]:
                record.done.add(sid)
                del record.partial[sid]
        merged[epoch] = record
    while floor in merged and len(merged[floor].done) == num_shards:
        del merged[floor]
        floor += 1
    metrics = {k: sum(int(s.get("metrics", {}).get(k, 0)) for s in by_rank) for k in COUNTER_KEYS}
    return {
        "format": STATE_FORMAT,
        "kind": "global",
        "seed": seed,
        "num_shards": num_shards,
        "digest": first["digest"],
        "floor": floor,
        "epochs": {
            str(e): {
                "done": sorted(r.done),
                "partial": {
                    str(sid): [sizes[sid], format(m, "x")] for sid, m in sorted(r.partial.items())
                },
            }
            for e, r in merged.items()
            if r.done or r.partial
        },
        "layout": {
            "world_size": world,
            "num_workers": workers,
            "next_worker": [int(s.get("next_worker", 0)) for s in by_rank],
        },
        "metrics": metrics,
    }
