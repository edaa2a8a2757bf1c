"""Bad samples inside readable shards (issue 14): non-finite tensors, malformed metadata,
misshapen or mistyped latents. Each is skipped, named once, counted and quarantined; never
a whole batch, never fatal, never silently cast; the same after a resume."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
import webdataset as wds

from scaletrain.data.loader import DataConfig, build_train_loader
from scaletrain.data.shard_format import encode_sample

from .conftest import step_until_floor


def rewrite_shard(data, name: str, mutate) -> None:
    """Rewrite shard ``name`` of a fixture dataset, ``mutate(key, latent, text, meta)``
    returning the (latent, text, meta) to store for each sample."""
    with wds.TarWriter(str(data.root / name)) as sink:
        for key in data.shard_keys[name]:
            _, latent, text, meta = data.samples[key]
            latent, text, meta = mutate(key, dict(latent), dict(text), dict(meta))
            sink.write(encode_sample(key, latent, text, meta))


def one_epoch(root, workers=0, world=1):
    config = DataConfig(path=str(root), batch_size=4, num_workers=workers)
    loaders = [build_train_loader(config, r, world, 0) for r in range(world)]
    seen, state = step_until_floor(loaders, 1)
    return Counter(k for e, k in seen.elements() if e == 0), state, loaders


def _nan_latent(key, latent, text, meta):
    if key == "s000-0002":
        mean = latent["mean"].clone()
        mean[0, 0, 0] = float("nan")
        latent["mean"] = mean
    if key == "s000-0005":
        text["hidden_states"] = torch.full_like(text["hidden_states"], float("inf"))
    return latent, text, meta


BAD_CASES = {
    "nan_latent_and_inf_text": (_nan_latent, {"s000-0002", "s000-0005"}),
    "original_size_null": (
        lambda k, la, t, m: (la, t, {**m, "original_size": [None, 64]} if k == "s000-0001"
                             else m), {"s000-0001"}),
    "original_size_empty": (
        lambda k, la, t, m: (la, t, {**m, "original_size": []} if k == "s000-0003" else m),
        {"s000-0003"}),
    "misshapen_latent": (
        lambda k, la, t, m: ({"mean": torch.randn(12, 5, 7).bfloat16(),
                              "std": torch.rand(12, 5, 7).bfloat16()} if k == "s000-0004"
                             else la, t, m), {"s000-0004"}),
    "latent_off_its_bucket": (  # right channels, wrong (h, w) for a 64x64 bucket
        lambda k, la, t, m: ({"mean": torch.randn(4, 5, 7).bfloat16(),
                              "std": torch.rand(4, 5, 7).bfloat16()} if k == "s000-0006"
                             else la, t, m), {"s000-0006"}),
    "int8_latent": (
        lambda k, la, t, m: ({"mean": la["mean"].to(torch.int8),
                              "std": la["std"].to(torch.int8)} if k == "s000-0007"
                             else la, t, m), {"s000-0007"}),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_sample_is_quarantined_not_its_batch(make_dataset, caplog, case):
    mutate, bad = BAD_CASES[case]
    data = make_dataset(num_shards=2, per_shard=8, buckets=((64, 64),))
    rewrite_shard(data, "000000.tar", mutate)
    with caplog.at_level(logging.WARNING):
        counts, state, loaders = one_epoch(data.root)
    # Exactly the bad samples are missing; every other sample of their batches was delivered.
    assert set(counts) == data.keys - bad and max(counts.values()) == 1
    metrics = loaders[0].metrics()
    assert metrics["bad_samples"] == len(bad) and metrics["failed_shards"] == 0
    quarantine = loaders[0].quarantined()
    assert {k.rsplit("/", 1)[-1] for k in quarantine} == bad
    assert all("/000000.tar/" in k for k in quarantine)
    for key in bad:  # named, with its shard
        assert sum(key in r.getMessage() and "000000.tar" in r.getMessage()
                   for r in caplog.records) == 1
    # Every delivered latent is float32 and finite (nothing cast or passed through silently).
    assert state["quarantine"] == quarantine


def test_bad_samples_are_named_once_over_epochs_and_resumes(make_dataset, caplog):
    data = make_dataset(num_shards=2, per_shard=8, buckets=((64, 64),))
    rewrite_shard(data, "000000.tar", BAD_CASES["misshapen_latent"][0])
    config = DataConfig(path=str(data.root), batch_size=4, num_workers=0)
    loader = build_train_loader(config, 0, 1, 0)
    with caplog.at_level(logging.WARNING):
        it = iter(loader)
        for _ in range(5):  # into epoch 1 (15 good samples, 3 full batches per epoch + carry)
            batch = next(it)
            assert torch.isfinite(batch["latents_mean"]).all() and torch.isfinite(batch["latents_std"]).all()
        state = loader.state_dict()
        # A restart (the crash at step 9 was here): the bad sample is met again, skipped.
        resumed = build_train_loader(config, 0, 1, 0, state=state)
        it = iter(resumed)
        for _ in range(12):
            batch = next(it)
            assert batch["latents_mean"].shape[1:] == (4, 8, 8)
    named = [r for r in caplog.records if "s000-0004" in r.getMessage()]
    assert len(named) == 1
    assert resumed.metrics()["bad_samples"] >= 3  # counted in each epoch that met it
    assert list(resumed.quarantined()) == [f"{data.root.name}/000000.tar/s000-0004"]


def test_bad_sample_in_the_first_shard_does_not_stop_start_up(make_dataset):
    # The first sample of the first shard defines the dataset's dims; a bad one there used to
    # kill the job before step 1.
    data = make_dataset(num_shards=2, per_shard=8, buckets=((64, 64),))
    rewrite_shard(data, "000000.tar", lambda k, la, t, m: (
        la, t, {**m, "original_size": [None, 64]} if k == "s000-0000" else m))
    counts, _, loaders = one_epoch(data.root, workers=1)
    assert set(counts) == data.keys - {"s000-0000"}
    assert loaders[0].metrics()["bad_samples"] == 1


@pytest.mark.parametrize("case", ["misshapen_latent", "int8_latent"])
def test_a_bad_first_sample_does_not_set_the_datasets_dims(make_dataset, case):
    # The first readable sample sets the dims and dtype every other one is held to; it is
    # held to what the index declares (preprocess records its image encoder's).
    import json

    data = make_dataset(num_shards=2, per_shard=8, buckets=((64, 64),))
    index = json.loads((data.root / "index.json").read_text())
    index["image_encoder"] = {"latent_channels": 4, "downsample": 8}
    (data.root / "index.json").write_text(json.dumps(index))
    mutate = BAD_CASES[case][0]
    first = data.shard_keys["000000.tar"][0]
    rewrite_shard(data, "000000.tar", lambda k, la, t, m: mutate(
        {first: "s000-0004", "s000-0004": "x"}.get(k, k) if case == "misshapen_latent"
        else {first: "s000-0007", "s000-0007": "x"}.get(k, k), la, t, m))
    counts, _, loaders = one_epoch(data.root)
    assert set(counts) == data.keys - {first}
    assert loaders[0].info.latent_channels == 4 and loaders[0].info.latent_dtype == "bfloat16"
