"""Mixtures of sources (weights, per-source epochs and exactly-once, resume at another world
size) and datasets whose shards change between resumes. Ranks are simulated in one process
and stepped in lockstep like a synchronous trainer."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import pytest

from scaletrain.data.loader import (
    DataConfig,
    NeedsGlobalState,
    StateError,
    build_train_loader,
    merge_states,
)
from scaletrain.data.loader.config import SourceConfig

ONE_BUCKET = ((64, 64),)


def mixture(*sources, world=1, workers=0, state=None, batch_size=2, seed=5, **cfg):
    config = DataConfig(sources=[SourceConfig(path=str(d.root), weight=w, name=n)
                                 for n, d, w in sources],
                        batch_size=batch_size, num_workers=workers, **cfg)
    return [build_train_loader(config, rank, world, seed, state) for rank in range(world)]


def step(loaders, steps, seen=None):
    """``steps`` lockstep steps; returns the batches; records (epoch, key) into ``seen``."""
    iterators = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        for it in iterators:
            batch = next(it)
            out.append(batch)
            if seen is not None:
                seen.extend(zip(batch["epochs"], batch["keys"]))
    return out


def close(loaders):
    for loader in loaders:
        loader.close()


def source_of(batch) -> str:
    prefixes = {key[0] for key in batch["keys"]}
    assert len(prefixes) == 1, f"a batch mixes sources: {batch['keys']}"
    return prefixes.pop()


def test_mixture_proportions_are_within_sampling_error(make_dataset):
    """800 batches from weights 1:2:5: each source's count of batches is within 4 standard
    deviations of its binomial expectation; the per-source metrics count the same."""
    a = make_dataset(num_shards=4, per_shard=8, buckets=ONE_BUCKET, key_prefix="a")
    b = make_dataset(num_shards=4, per_shard=8, buckets=ONE_BUCKET, key_prefix="b", seed=1)
    c = make_dataset(num_shards=4, per_shard=8, buckets=((64, 64), (64, 96)), key_prefix="c",
                     seed=2)
    (loader,) = mixture(("a", a, 1.0), ("b", b, 2.0), ("c", c, 5.0))
    n = 800
    counts = Counter(source_of(batch) for batch in step([loader], n))
    for name, weight in (("a", 1), ("b", 2), ("c", 5)):
        p = weight / 8
        assert abs(counts[name] - n * p) < 4 * math.sqrt(n * p * (1 - p)), counts
        assert loader.metrics()[f"source/{name}/samples"] == 2 * counts[name]
    # Source a (32 samples) went through ~6 epochs, c (32 samples, 5x the weight) ~31.
    metrics = loader.metrics()
    assert metrics["source/a/epoch"] < metrics["source/c/epoch"]
    loader.close()


def test_mixture_counts_are_exact_after_a_resume_at_another_world_size(make_dataset):
    """Batch g's source depends on (seed, g) only: 24 batches on 2 ranks then 36 on 3 ranks
    (2 workers) give each source exactly the samples of 60 uninterrupted batches on 2 ranks,
    and no sample twice in an epoch."""
    a = make_dataset(num_shards=6, per_shard=8, buckets=ONE_BUCKET, key_prefix="a")
    b = make_dataset(num_shards=6, per_shard=8, buckets=ONE_BUCKET, key_prefix="b", seed=1)
    sources = (("a", a, 1.0), ("b", b, 3.0))

    reference = mixture(*sources, world=2, workers=1)
    step(reference, 30)
    expected = merge_states([loader.state_dict() for loader in reference])
    close(reference)

    seen: list = []
    first = mixture(*sources, world=2, workers=1)
    step(first, 12, seen)
    state = json.loads(json.dumps(merge_states([loader.state_dict() for loader in first])))
    close(first)
    second = mixture(*sources, world=3, workers=2, state=state)
    step(second, 12, seen)
    got = merge_states([loader.state_dict() for loader in second])
    close(second)

    assert got["batches"]["base"] == expected["batches"]["base"] == 60
    assert got["source_metrics"] == expected["source_metrics"]
    assert sum(m["samples"] for m in got["source_metrics"].values()) == 120
    assert max(Counter(seen).values()) == 1  # (epoch, key): once


def test_each_source_sees_every_sample_once_per_epoch(make_dataset):
    """A small source (2 shards, fewer than the 4 slots) cycles faster than a large one;
    each keeps its own epochs, and within each of them every sample comes exactly once."""
    small = make_dataset(num_shards=2, per_shard=6, buckets=ONE_BUCKET, key_prefix="a")
    large = make_dataset(num_shards=6, per_shard=8, key_prefix="b", seed=1)
    loaders = mixture(("small", small, 1.0), ("large", large, 1.0), world=2, workers=2)
    seen: list = []
    iterators = [iter(loader) for loader in loaders]
    for _ in range(300):
        for it in iterators:
            batch = next(it)
            seen.extend(zip(batch["epochs"], batch["keys"]))
        state = merge_states([loader.state_dict() for loader in loaders])
        floors = {n: s["floor"] for n, s in state["sources"].items()}
        if floors["large"] >= 2:
            break
    close(loaders)
    assert floors["small"] > floors["large"] >= 2
    for name, data, prefix in (("small", small, "a"), ("large", large, "b")):
        for epoch in range(floors[name]):
            counts = Counter(k for e, k in seen if e == epoch and k.startswith(prefix))
            assert set(counts) == data.keys and max(counts.values()) == 1, (name, epoch)


def _grow_and_shrink(data, make_more):
    """Remove 000001.tar (file and index entry) and add two shards 000006, 000007."""
    index_path = data.root / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"] = [s for s in index["shards"] if s["name"] != "000001.tar"]
    index_path.write_text(json.dumps(index))
    (data.root / "000001.tar").unlink()
    added = make_more(data.root, num_shards=2, per_shard=8, buckets=ONE_BUCKET, seed=9,
                      first_shard=6)
    return set(data.shard_keys["000001.tar"]), added.keys


@pytest.fixture
def grown(make_dataset):
    from .conftest import write_latent_dataset

    data = make_dataset(num_shards=6, per_shard=8, buckets=ONE_BUCKET)
    seen: list = []
    loaders = [build_train_loader(DataConfig(path=str(data.root), batch_size=4, num_workers=1),
                                  r, 2, 3) for r in range(2)]
    step(loaders, 3, seen)  # 24 of epoch 0's 48 samples
    rank_states = [loader.state_dict() for loader in loaders]
    state = merge_states(rank_states)
    close(loaders)
    removed, added = _grow_and_shrink(data, write_latent_dataset)
    return data, seen, state, rank_states, removed, added


@pytest.mark.parametrize("join", ["next_epoch", "now"])
def test_shards_added_and_removed_between_resumes(grown, join, caplog):
    data, seen, state, _, removed, added = grown
    unseen_removed = removed - {k for _, k in seen}
    assert unseen_removed  # the removed shard was not finished when the state was taken
    config = DataConfig(path=str(data.root), batch_size=4, num_workers=2, join_new_shards=join)
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(config, 0, 1, 3, state)  # another layout too
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert f"000001.tar (8 samples, {len(unseen_removed)} of them not yet read" in log
    assert "2 new shards join" in log and "000006.tar, 000007.tar" in log
    it = iter(loader)
    while json.loads(json.dumps(merge_states([loader.state_dict()])))["sources"][
            data.root.name]["floor"] < 3:
        batch = next(it)
        seen.extend(zip(batch["epochs"], batch["keys"]))
    loader.close()
    old = data.keys - added
    current = old - removed | added
    epoch0 = Counter(k for e, k in seen if e == 0)
    assert max(epoch0.values()) == 1
    if join == "now":  # the new shards are read in the epoch in progress already
        assert set(epoch0) == old - unseen_removed | added
    else:
        assert set(epoch0) == old - unseen_removed
    for epoch in (1, 2):
        counts = Counter(k for e, k in seen if e == epoch)
        assert set(counts) == current and max(counts.values()) == 1


def test_missing_shards_error_names_them(grown):
    data, _, state, _, _, _ = grown
    config = DataConfig(path=str(data.root), batch_size=4, num_workers=0,
                        missing_shards="error")
    with pytest.raises(StateError, match=r"lost 1 shards since the checkpoint: 000001.tar \(8 "):
        build_train_loader(config, 0, 1, 3, state)


def test_a_rank_state_asks_for_the_global_state_when_shards_changed(grown):
    data, _, _, rank_states, _, _ = grown
    config = DataConfig(path=str(data.root), batch_size=4, num_workers=1)
    with pytest.raises(NeedsGlobalState, match="shard list changed"):
        build_train_loader(config, 0, 2, 3, rank_states[0])


def test_a_source_with_no_readable_shard_is_dropped_and_training_goes_on(make_dataset, caplog):
    good = make_dataset(num_shards=4, per_shard=8, buckets=ONE_BUCKET, key_prefix="g")
    bad = make_dataset(num_shards=3, per_shard=8, buckets=ONE_BUCKET, key_prefix="b", seed=1)
    for name in bad.shard_keys:
        (bad.root / name).write_bytes(b"not a tar at all" * 40)
    with caplog.at_level(logging.WARNING):
        (loader,) = mixture(("good", good, 1.0), ("bad", bad, 1.0), workers=1)
        batches = step([loader], 40)
    assert {source_of(b) for b in batches} == {"g"}
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "data.sources[1]" in log and "no readable sample" in log
    assert "none of the shards of source 'bad' could be read" in log
    assert "training goes on with the other sources" in log
    metrics = loader.metrics()
    assert metrics["source/bad/failed_shards"] >= 3 and metrics["source/bad/samples"] == 0
    assert metrics["source/good/samples"] == 80
    loader.close()


def test_mixture_config_errors_name_the_key(make_dataset):
    from scaletrain.core.config_base import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"data.sources\[1\].name: 'x' is the name"):
        from_dict(DataConfig, {"sources": [{"path": "/a/x"}, {"path": "/b/x"}]}, "data")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight: must be > 0"):
        from_dict(DataConfig, {"sources": [{"path": "/a", "weight": 0}]}, "data")
    with pytest.raises(ConfigError, match="data.sources: give data.path"):
        from_dict(DataConfig, {"path": "/a", "sources": [{"path": "/b"}]}, "data")
    a = make_dataset(num_shards=2, per_shard=4, key_prefix="a")
    b = make_dataset(num_shards=2, per_shard=4, key_prefix="b", text_dim=8)
    with pytest.raises(ConfigError, match=r"data.sources\[1\].path: schema"):
        mixture(("a", a, 1.0), ("b", b, 1.0))
