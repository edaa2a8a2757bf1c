"""A shard read that blocks (issue 14): a FIFO named like a shard stands in for a hung network
mount. The read times out (data.storage.read_timeout_s), the shard is named, skipped and
recorded, and training goes on."""

from __future__ import annotations

import logging
import os
from collections import Counter

import pytest

from scaletrain.data.loader import DataConfig, build_train_loader
from scaletrain.data.storage import StorageConfig

from .conftest import step_until_floor


@pytest.fixture
def fifo_shard(make_dataset):
    data = make_dataset(num_shards=3, per_shard=8, buckets=((64, 64),))
    path = data.root / "000001.tar"
    path.unlink()
    os.mkfifo(path)
    yield data, path
    # Release the reader threads still blocked in open(): a writer that opens and closes.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def test_default_read_timeout_is_set():
    assert DataConfig().storage.read_timeout_s > 0


@pytest.mark.parametrize("workers", [0, 1])
def test_a_blocked_shard_read_times_out_and_is_named(fifo_shard, caplog, workers):
    data, path = fifo_shard
    config = DataConfig(path=str(data.root), batch_size=4, num_workers=workers,
                        storage=StorageConfig(read_timeout_s=0.5))
    loader = build_train_loader(config, 0, 1, 0)
    with caplog.at_level(logging.WARNING):
        seen, state = step_until_floor([loader], 2, max_steps=40)
    counts = Counter(k for e, k in seen.elements() if e == 0)
    assert set(counts) == data.keys - set(data.shard_keys["000001.tar"])
    assert state["metrics"]["failed_shards"] >= 2  # once per epoch, each time within bounds
    assert state["metrics"]["lost_samples"] >= 16
    named = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert named and all("read_timeout_s" in m for m in named)
    assert f"{data.root.name}/000001.tar" in state["quarantine"]
