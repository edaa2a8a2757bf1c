"""The loader reading latent shards from a real S3 server on 127.0.0.1 (moto, see
tests/support/s3_server.py): the same batches as from local disk, faults retried without loss
and counted, shards that fail after the retries recorded like bad local shards, unknown
schemes refused."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import fsspec
import pytest
import torch

from scaletrain.core.config_base import ConfigError, from_dict
from scaletrain.data.loader import DataConfig, build_train_loader, merge_states, read_dataset_info
from scaletrain.data.loader.shard_reader import iter_stored_samples, iter_streamed_samples
from scaletrain.data.storage import RemoteStream, StorageConfig
from tests.support.s3_server import DroppingProxy

from .conftest import floor_of, step_until_floor


def upload(s3_server, local_root) -> str:
    bucket = s3_server.new_bucket()
    fs = fsspec.filesystem("s3")
    for path in sorted(local_root.iterdir()):
        fs.put_file(str(path), f"{bucket}/latents/{path.name}")
    return f"s3://{bucket}/latents"


def take(loader, steps):
    it = iter(loader)
    return [next(it) for _ in range(steps)]


@pytest.fixture
def remote(s3_server, dataset):
    return upload(s3_server, dataset.root)


def test_streamed_tar_parser_agrees_with_the_mapped_one(dataset):
    """The streaming parser (remote shards) and the memory-mapped one (local) yield the same
    samples, also for pax headers (a long key) and a directory member."""
    path = dataset.root / "000001.tar"
    stream = io.BytesIO(path.read_bytes())
    streamed = [(s.position, s.key, {k: bytes(v) for k, v in s.files.items()})
                for s in iter_streamed_samples(stream)]
    mapped = [(s.position, s.key, {k: bytes(v) for k, v in s.files.items()})
              for s in iter_stored_samples(path)]
    assert streamed == mapped and len(mapped) == 12

    buf = io.BytesIO()
    long_key = "k" * 150
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("dir"))  # not a regular file: skipped
        for ext, data in (("txt", b"hello"), ("json", b"{}")):
            info = tarfile.TarInfo(f"{long_key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (only,) = list(iter_streamed_samples(io.BytesIO(buf.getvalue())))
    assert only.key == long_key and bytes(only.files["txt"]) == b"hello"


def test_remote_loader_gives_the_same_batches_as_local(dataset, remote):
    info = read_dataset_info(remote)
    assert info.num_samples == 96 and info.empty_prompt is not None
    local = build_train_loader(DataConfig(path=str(dataset.root), batch_size=4, num_workers=0),
                               0, 1, 3)
    s3 = build_train_loader(DataConfig(path=remote, batch_size=4, num_workers=0,
                                       storage=StorageConfig(block_mb=0.05)), 0, 1, 3)
    a, b = take(local, 30), take(s3, 30)  # past an epoch (24 batches)
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x["latents_mean"], y["latents_mean"])
        assert torch.equal(x["latents_std"], y["latents_std"])
        assert torch.equal(x["encoder_hidden_states"], y["encoder_hidden_states"])
    assert s3.metrics()["read_retries"] == 0


def test_dropped_connections_lose_nothing_and_are_counted(s3_server, dataset, remote):
    """Every ~200 KB of responses the proxy cuts a connection mid-body. Two ranks with two
    workers each read two epochs: every sample exactly once, nothing lost, retries counted."""
    proxy = DroppingProxy(s3_server.port, drop_every=200_000)
    try:
        storage = StorageConfig(endpoint_url=proxy.endpoint, block_mb=0.06,
                                retry_backoff_s=0.01, max_retries=8)
        config = DataConfig(path=remote, batch_size=4, num_workers=2, storage=storage)
        loaders = [build_train_loader(config, rank, 2, 0) for rank in range(2)]
        seen, state = step_until_floor(loaders, 2, max_steps=60)
    finally:
        proxy.close()
    assert floor_of(state) >= 2
    for epoch in (0, 1):
        assert {k for e, k in seen if e == epoch} == dataset.keys
    assert max(seen.values()) == 1
    assert state["metrics"]["lost_samples"] == 0 and state["metrics"]["failed_shards"] == 0
    assert proxy.drops >= 3
    assert state["metrics"]["read_retries"] >= 1


def test_a_read_failing_after_its_retries_is_a_failed_shard(s3_server, dataset, remote):
    """A proxy that drops every response: the shard fails after max_retries, is recorded as
    failed with its unread samples lost, and training goes on."""
    stats_proxy = DroppingProxy(s3_server.port, drop_every=1)
    try:
        cfg = StorageConfig(endpoint_url=stats_proxy.endpoint, max_retries=2,
                            retry_backoff_s=0.01)
        stream = RemoteStream(f"{remote}/000000.tar", cfg, total=1 << 20)
        with pytest.raises(OSError, match="after 3 attempts"):
            stream.read(100)
        stream.close()
        assert stream.stats.retries == 2
    finally:
        stats_proxy.close()

    fs = fsspec.filesystem("s3")
    fs.rm_file(remote[len("s3://"):] + "/000002.tar")  # gone: not transient, not retried
    config = DataConfig(path=remote, batch_size=4, num_workers=0)
    (loader,) = [build_train_loader(config, 0, 1, 0)]
    it = iter(loader)
    seen = Counter()
    while floor_of(merge_states([loader.state_dict()])) < 1:
        batch = next(it)
        seen.update(k for e, k in zip(batch["epochs"], batch["keys"]) if e == 0)
    assert dataset.keys - set(seen) == set(dataset.shard_keys["000002.tar"])
    metrics = loader.metrics()
    assert metrics["failed_shards"] == 1 and metrics["lost_samples"] == 12


def test_unknown_schemes_are_refused():
    """Never taken for a local directory named 'nosuch:'."""
    with pytest.raises(ConfigError, match="data.path: unknown scheme 'nosuch'"):
        from_dict(DataConfig, {"path": "nosuch://bucket/latents"}, "data")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path: unknown scheme"):
        from_dict(DataConfig, {"sources": [{"path": "nosuch://b/x"}]}, "data")
