"""Exactly-once over epochs, save/restore, and resume on a different layout, with ranks
simulated in one process (one loader per rank, stepped in lockstep like a synchronous trainer).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from scaletrain.data.loader import DataConfig, StateError, build_train_loader, merge_states

from .conftest import floor_of


def make_loaders(path, world, workers, state=None, seed=7, batch_size=4, **cfg):
    config = DataConfig(path=str(path), batch_size=batch_size, num_workers=workers, **cfg)
    return [build_train_loader(config, rank, world, seed, state) for rank in range(world)]


def step_all(iterators, seen):
    """One training step: every rank takes one batch. Records (epoch, key) per rank."""
    batches = []
    for it in iterators:
        batch = next(it)
        seen.extend(zip(batch["epochs"], batch["keys"]))
        batches.append(batch)
    return batches


def run_until(loaders, seen, done, max_steps=400):
    iterators = [iter(loader) for loader in loaders]
    for _ in range(max_steps):
        step_all(iterators, seen)
        if done():
            return
    raise AssertionError(f"not done after {max_steps} steps")


def epoch_counts(seen, epoch):
    return Counter(key for e, key in seen if e == epoch)


def close(loaders):
    for loader in loaders:
        loader.close()


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 1), (2, 2), (3, 2)])
def test_every_sample_exactly_once_per_epoch(dataset, world, workers):
    loaders = make_loaders(dataset.root, world, workers)
    seen: list[tuple[int, str]] = []
    # Run until two whole epochs are out: epoch 0's carried leftovers are then out too, and
    # any sample handed out twice would show as a count of 2.
    run_until(loaders, seen, lambda: len(epoch_counts(seen, 1)) == len(dataset.keys))
    for epoch in (0, 1):
        counts = epoch_counts(seen, epoch)
        assert set(counts) == dataset.keys, f"epoch {epoch} missed samples"
        assert max(counts.values()) == 1, f"epoch {epoch} repeated {counts.most_common(1)}"
    state = merge_states([loader.state_dict() for loader in loaders])
    assert floor_of(state) >= 2  # the merged progress agrees: epochs 0 and 1 are finished
    # The two epochs visit samples in different orders.
    order0 = [k for e, k in seen if e == 0]
    order1 = [k for e, k in seen if e == 1]
    assert order0 != order1
    for loader in loaders:
        assert loader.metrics()["lost_samples"] == 0
        assert loader.epoch >= 1
    close(loaders)


def test_batches_are_full_and_from_one_bucket(dataset):
    (loader,) = make_loaders(dataset.root, 1, 0, batch_size=5)
    it = iter(loader)
    shapes = set()
    for _ in range(40):
        batch = next(it)
        assert len(batch["keys"]) == 5
        buckets = {tuple(dataset.samples[k][3]["bucket"]) for k in batch["keys"]}
        assert len(buckets) == 1
        (h, w) = buckets.pop()
        assert batch["latents_mean"].shape == (5, 4, h // 8, w // 8)
        shapes.add(batch["latents_mean"].shape)
    assert len(shapes) == 3  # all three aspect buckets occur


def test_leftovers_are_carried_into_the_next_epoch(dataset):
    """No sample is dropped at an epoch's end: a bucket's remainder completes a batch with
    samples of the next epoch."""
    (loader,) = make_loaders(dataset.root, 1, 0, batch_size=5)
    it = iter(loader)
    batches = [next(it) for _ in range(60)]  # 96 samples / 5: about 3 epochs
    mixed = [b["epochs"] for b in batches if len(set(b["epochs"])) > 1]
    assert mixed and all(sorted(set(e)) in ([0, 1], [1, 2], [2, 3]) for e in mixed)
    seen = Counter((e, k) for b in batches for e, k in zip(b["epochs"], b["keys"]))
    assert max(seen.values()) == 1 and len([1 for e, _ in seen if e == 0]) == 96


def _collect(iterators, steps):
    out = [[] for _ in iterators]
    for _ in range(steps):
        for rank, it in enumerate(iterators):
            out[rank].append(next(it))
    return out


def _assert_same_batches(a, b):
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    for x, y in zip(a, b):
        for name in ("latents_mean", "latents_std", "encoder_hidden_states", "pooled"):
            assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("world,workers,via_merge", [(1, 0, False), (2, 2, False), (2, 2, True)])
def test_restore_mid_epoch_continues_the_same_stream(dataset, world, workers, via_merge):
    # 96 samples, 4 per batch, 2 ranks: an epoch is 12 steps; 7 + 9 crosses into epoch 1.
    first, second = 7, 9
    reference = make_loaders(dataset.root, world, workers)
    expected = _collect([iter(loader) for loader in reference], first + second)
    close(reference)

    interrupted = make_loaders(dataset.root, world, workers)
    head = _collect([iter(loader) for loader in interrupted], first)
    states = [loader.state_dict() for loader in interrupted]
    close(interrupted)
    del interrupted  # the restored loaders must not depend on the old processes

    states = json.loads(json.dumps(states))  # states are plain JSON-ready data
    if via_merge:
        resumed = make_loaders(dataset.root, world, workers, state=merge_states(states))
    else:
        config = DataConfig(path=str(dataset.root), batch_size=4, num_workers=workers)
        resumed = [build_train_loader(config, r, world, 7, states[r]) for r in range(world)]
    tail = _collect([iter(loader) for loader in resumed], second)
    close(resumed)
    for rank in range(world):
        _assert_same_batches(head[rank] + tail[rank], expected[rank])


@pytest.mark.parametrize(
    "before,after", [((2, 1), (3, 2)), ((3, 2), (1, 0)), ((2, 2), (2, 1)), ((1, 0), (2, 2))]
)
def test_resume_with_another_layout_loses_and_repeats_nothing(dataset, before, after):
    seen: list[tuple[int, str]] = []
    loaders = make_loaders(dataset.root, *before)
    iterators = [iter(loader) for loader in loaders]
    for _ in range(5):
        step_all(iterators, seen)
    state = merge_states([loader.state_dict() for loader in loaders])
    close(loaders)
    assert 0 < len(epoch_counts(seen, 0)) < len(dataset.keys)

    resumed = make_loaders(dataset.root, *after, state=state)
    run_until(resumed, seen, lambda: len(epoch_counts(seen, 1)) == len(dataset.keys))
    for epoch in (0, 1):
        counts = epoch_counts(seen, epoch)
        assert set(counts) == dataset.keys, f"epoch {epoch} lost samples"
        assert max(counts.values()) == 1, f"epoch {epoch} repeated {counts.most_common(1)}"
    close(resumed)


def test_resume_twice_across_layouts_and_an_epoch_boundary(dataset):
    """(2,1) -> (3,1) -> (2,1): a second resume into yet another layout still holds."""
    seen: list[tuple[int, str]] = []
    state = None
    for layout, steps in (((2, 1), 9), ((3, 1), 6), ((2, 1), 0)):
        loaders = make_loaders(dataset.root, *layout, state=state)
        if steps == 0:
            run_until(loaders, seen, lambda: len(epoch_counts(seen, 1)) == len(dataset.keys))
        else:
            iterators = [iter(loader) for loader in loaders]
            for _ in range(steps):
                step_all(iterators, seen)
        state = merge_states([loader.state_dict() for loader in loaders])
        close(loaders)
    for epoch in (0, 1):
        counts = epoch_counts(seen, epoch)
        assert set(counts) == dataset.keys and max(counts.values()) == 1


def test_rank_state_restores_only_into_its_own_rank_and_layout(dataset):
    loaders = make_loaders(dataset.root, 2, 1)
    _collect([iter(loader) for loader in loaders], 2)
    states = [loader.state_dict() for loader in loaders]
    close(loaders)
    config = DataConfig(path=str(dataset.root), batch_size=4, num_workers=1)
    with pytest.raises(StateError, match="merge_states"):
        build_train_loader(config, 1, 2, 7, states[0])
    with pytest.raises(StateError, match="merge_states"):
        build_train_loader(config, 0, 3, 7, states[0])
    with pytest.raises(StateError, match="seed"):
        build_train_loader(config, 0, 2, 8, states[0])
    with pytest.raises(StateError, match="one state per rank"):
        merge_states(states[:1])


def test_rewritten_shards_are_named_and_refused_with_missing_shards_error(dataset, make_dataset):
    loaders = make_loaders(dataset.root, 1, 0)
    _collect([iter(loaders[0])], 1)
    state = merge_states([loaders[0].state_dict()])
    other = make_dataset(num_shards=8, per_shard=13)  # the same names, other counts
    state["sources"][other.root.name] = state["sources"].pop(dataset.root.name)
    config = DataConfig(path=str(other.root), batch_size=4, num_workers=0,
                        missing_shards="error")
    with pytest.raises(StateError, match=r"000000.tar \(rewritten: 12 -> 13 samples"):
        build_train_loader(config, 0, 1, 7, state)


def test_a_state_of_the_first_format_still_restores(dataset):
    """Checkpoints written before sources existed (format 1: shard ids, a digest of the list)
    resume while the shard list is the one they were saved on."""
    from scaletrain.data.loader.dataset_index import load_dataset_index
    from scaletrain.data.loader.progress import list_digest

    shards = load_dataset_index(dataset.root).shard_list
    old = {"format": "scaletrain.loader.progress/1", "kind": "global", "seed": 7,
           "num_shards": 8, "digest": list_digest(shards), "floor": 0,
           "epochs": {"0": {"done": [0], "partial": {"1": [12, "3"]}}},  # positions 0 and 1
           "layout": {"world_size": 1, "num_workers": 0, "next_worker": [0]},
           "metrics": {"lost_samples": 2}}
    loaders = make_loaders(dataset.root, 2, 1, state=old)  # another layout too
    loader = loaders[0]
    skipped = set(dataset.shard_keys["000000.tar"]) | set(dataset.shard_keys["000001.tar"][:2])
    seen: list = []
    run_until(loaders, seen, lambda: len(epoch_counts(seen, 1)) == len(dataset.keys))
    close(loaders)
    assert set(epoch_counts(seen, 0)) == dataset.keys - skipped
    assert max(epoch_counts(seen, 0).values()) == 1
    assert loader.metrics()["lost_samples"] == 2
    other = {**old, "digest": "0" * 16}
    with pytest.raises(StateError, match="first format.*another shard list"):
        make_loaders(dataset.root, 1, 0, state=other)
