"""Unit tests of the epoch plan, the shard reader's shuffle and the progress records."""

from __future__ import annotations

from collections import Counter

import pytest

from scaletrain.data.loader.plan import shard_order, shards_for_rank, shards_for_slot
from scaletrain.data.loader.progress import (
    STATE_FORMAT,
    SavedSource,
    SourceProgress,
    StateError,
    merge_states,
)
from scaletrain.data.loader.shard_reader import RawSample, ShardFailure, read_shard_shuffled


@pytest.mark.parametrize("n,world,workers", [(8, 1, 1), (10, 2, 2), (17, 3, 2), (64, 4, 8)])
def test_each_shard_goes_to_exactly_one_slot_per_epoch(n, world, workers):
    for epoch in range(5):
        dealt = Counter()
        for rank in range(world):
            for worker in range(workers):
                dealt.update(shards_for_slot(11, epoch, n, world, workers, rank, worker))
        assert dealt == Counter(range(n))
        owned = [shards_for_rank(11, epoch, n, world, workers, r) for r in range(world)]
        assert sum(len(o) for o in owned) == n and set().union(*owned) == set(range(n))


def test_dealing_balances_slots_over_epochs():
    """10 shards over 4 slots: 2 or 3 per epoch, and the extra shards rotate between slots so
    that over 2 epochs (20 shards) every slot gets exactly 5."""
    n, world, workers = 10, 2, 2
    totals = Counter()
    for epoch in range(2):
        for rank in range(world):
            for worker in range(workers):
                got = shards_for_slot(0, epoch, n, world, workers, rank, worker)
                assert len(got) in (2, 3)
                totals[rank, worker] += len(got)
    assert set(totals.values()) == {5}


def test_shard_order_is_a_seeded_permutation():
    assert sorted(shard_order(1, 0, 50)) == list(range(50))
    assert shard_order(1, 0, 50) == shard_order(1, 0, 50)
    assert shard_order(1, 0, 50) != shard_order(1, 1, 50)
    assert shard_order(1, 0, 50) != shard_order(2, 0, 50)


def _positions(path, expected, buffer, seed):
    return [
        item.position if isinstance(item, RawSample) else item
        for item in read_shard_shuffled(path, expected, buffer, seed)
    ]


def test_shard_shuffle_is_a_seeded_permutation(dataset):
    path = dataset.root / "000000.tar"
    full = _positions(path, 12, 64, seed=5)
    assert sorted(full) == list(range(12)) and full != list(range(12))
    assert full == _positions(path, 12, 64, seed=5)
    assert full != _positions(path, 12, 64, seed=6)
    small = _positions(path, 12, 4, seed=5)  # a small buffer still covers every sample once
    assert sorted(small) == list(range(12))
    assert _positions(path, 12, 0, seed=5) == list(range(12))


def test_reader_reports_a_shorter_tar_than_the_index(dataset):
    items = list(read_shard_shuffled(dataset.root / "000000.tar", 14, 4, seed=1))
    failure = items[-1]
    assert isinstance(failure, ShardFailure) and failure.unread == [12, 13]
    assert "index says 14" in failure.reason
    missing = list(read_shard_shuffled(dataset.root / "nope.tar", 3, 4, seed=1))
    assert len(missing) == 1 and missing[0].unread == [0, 1, 2]


def _progress(rank, world=2, workers=1, sizes=(4,) * 6):
    shards = tuple((f"{i:06d}.tar", n) for i, n in enumerate(sizes))
    return SourceProgress("s", 0, [(0, shards)], world, workers, rank)


def _state(p):
    """A rank's loader state holding one source, as TrainLoader.state_dict writes it."""
    return {"format": STATE_FORMAT, "kind": "rank", "seed": 0, "world_size": p.world_size,
            "num_workers": p.num_workers, "rank": p.rank, "sources": {"s": p.to_json()},
            "batches": {"base": 0, "taken": 3}, "next_worker": 0}


def _merged_source(progresses):
    merged = merge_states([_state(p) for p in progresses])
    return merged, SavedSource.from_json(merged["sources"]["s"], "test")


def _finish_epoch(progress, epoch):
    for shard in progress.owned(epoch):
        progress.mark(epoch, shard, range(progress.list_for(epoch)[shard][1]))


def test_rank_progress_floor_and_merge():
    ranks = [_progress(0), _progress(1)]
    _finish_epoch(ranks[0], 0)
    _finish_epoch(ranks[0], 1)
    assert ranks[0].floor == 2 and ranks[0].epochs == {}
    shard = sorted(ranks[1].owned(0))[0]
    ranks[1].mark(0, shard, [0, 2])
    merged, source = _merged_source(ranks)
    assert source.floor == 0
    assert merged["batches"] == {"base": 6, "taken": 0}  # 3 batches taken by each of 2 ranks
    epoch0 = source.epochs[0]
    assert epoch0.done == set(ranks[0].owned(0))  # rank 0's floor implies these
    assert epoch0.partial == {shard: 0b101}  # positions 0 and 2
    assert source.epochs[1].done == set(ranks[0].owned(1))
    # Finishing rank 1's epoch 0 lets the merged floor advance past epoch 0.
    _finish_epoch(ranks[1], 0)
    assert _merged_source(ranks)[1].floor == 1


def test_global_state_is_split_by_the_new_layout():
    ranks = [_progress(0), _progress(1)]
    for p in ranks:
        for shard in sorted(p.owned(0)):
            p.mark(0, shard, [1])
    _, source = _merged_source(ranks)
    new = [_progress(r, world=3, workers=2) for r in range(3)]
    for p in new:
        p.take(source, only_owned=True)
    recorded = Counter()
    for p in new:
        for shard, mask in p.epochs[0].partial.items():
            assert mask == 0b10 and shard in p.owned(0)
            recorded[shard] += 1
    assert recorded == Counter(range(6))


def test_marking_a_shard_of_another_rank_is_a_bug():
    p = _progress(0)
    foreign = next(s for s in range(6) if s not in p.owned(0))
    with pytest.raises(RuntimeError, match="does not own"):
        p.mark(0, foreign, [0])


def test_fewer_shards_than_slots_still_finish_epochs():
    """2 shards over 4 slots: a rank that owns no shard of an epoch is done with it at once,
    so floors advance and merged epochs complete."""
    ranks = [_progress(r, world=2, workers=2, sizes=(4, 4)) for r in range(2)]
    for epoch in range(3):
        for p in ranks:
            if epoch >= p.floor:
                _finish_epoch(p, epoch)
    assert all(p.floor >= 3 for p in ranks)
    assert _merged_source(ranks)[1].floor >= 3


def test_merge_rejects_mixed_layouts():
    a, b = _progress(0), _progress(1, world=2, workers=2)
    with pytest.raises(StateError, match="different"):
        merge_states([_state(a), _state(b)])
