"""Unreadable shards and samples: logged, skipped, counted as lost; no crash, no repeat."""

from __future__ import annotations

import logging
from collections import Counter

import webdataset as wds

from scaletrain.data.loader import DataConfig, build_train_loader
from scaletrain.data.shard_format import encode_sample

from .conftest import step_until_floor


def run_epochs(path, world, workers, epochs=1, max_steps=300):
    """Step every rank until the merged progress says ``epochs`` epochs are finished."""
    config = DataConfig(path=str(path), batch_size=4, num_workers=workers)
    loaders = [build_train_loader(config, r, world, 0) for r in range(world)]
    seen, state = step_until_floor(loaders, epochs, max_steps)
    return list(seen.elements()), state, loaders


def test_truncated_shard_is_skipped_and_its_unread_samples_counted(dataset, caplog):
    path = dataset.root / "000003.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut mid-sample
    with caplog.at_level(logging.WARNING):
        seen, state, loaders = run_epochs(dataset.root, 2, 1)
    counts = Counter(k for e, k in seen if e == 0)
    assert max(counts.values()) == 1
    missing = dataset.keys - set(counts)
    stored = dataset.shard_keys["000003.tar"]
    # What is missing is exactly the tail of the truncated shard, in stored order.
    assert missing and missing == set(stored[len(stored) - len(missing) :])
    assert len(missing) < len(stored)  # the samples before the cut were delivered
    assert state["metrics"]["failed_shards"] >= 1
    assert state["metrics"]["lost_samples"] >= len(missing)
    assert any("000003.tar" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records)


def test_missing_shard_loses_all_its_samples(dataset):
    (dataset.root / "000005.tar").unlink()
    seen, state, loaders = run_epochs(dataset.root, 1, 2)
    counts = Counter(k for e, k in seen if e == 0)
    assert max(counts.values()) == 1
    assert dataset.keys - set(counts) == set(dataset.shard_keys["000005.tar"])
    metrics = loaders[0].metrics()
    assert metrics["failed_shards"] >= 1 and metrics["lost_samples"] >= 12


def test_undecodable_sample_is_counted_as_bad(make_dataset):
    data = make_dataset(num_shards=2, per_shard=8, buckets=((64, 64),))
    # Rewrite shard 0 with one sample whose latent bytes are garbage.
    name = "000000.tar"
    with wds.TarWriter(str(data.root / name)) as sink:
        for key in data.shard_keys[name]:
            _, latent, text, meta = data.samples[key]
            sample = encode_sample(key, latent, text, meta)
            if key.endswith("0002"):
                sample["latent.safetensors"] = b"not safetensors"
            sink.write(sample)
    seen, state, loaders = run_epochs(data.root, 1, 0)
    counts = Counter(k for e, k in seen if e == 0)
    assert set(counts) == data.keys - {"s000-0002"} and max(counts.values()) == 1
    assert loaders[0].metrics()["bad_samples"] >= 1
    assert loaders[0].metrics()["failed_shards"] == 0


def test_a_resume_does_not_count_a_failure_twice(dataset):
    path = dataset.root / "000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    config = DataConfig(path=str(dataset.root), batch_size=4, num_workers=0)
    loader = build_train_loader(config, 0, 1, 0)
    it = iter(loader)
    for _ in range(20):  # most of epoch 0 (96 samples, 24 batches)
        next(it)
    lost = loader.metrics()["lost_samples"]
    assert lost > 0  # the failure was met and recorded before the state was taken
    state = loader.state_dict()
    resumed = build_train_loader(config, 0, 1, 0, state)
    it = iter(resumed)
    for _ in range(2):
        next(it)
    assert resumed.metrics()["lost_samples"] == lost  # replaying the shard adds no new loss
