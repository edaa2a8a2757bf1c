"""Reading the dataset index and info; DataConfig validation; clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from scaletrain.core.config_base import ConfigError, from_dict
from scaletrain.data.loader import DataConfig, build_train_loader, read_dataset_info
from scaletrain.data.loader.dataset_index import load_dataset_index

from .conftest import floor_of, step_until_floor


def test_read_dataset_info(make_dataset):
    data = make_dataset(text_dim=16, pooled_dim=8, t5_dim=24, scaling=0.13, shift=0.06)
    info = read_dataset_info(data.root)
    assert info.num_samples == 96 and info.num_shards == 8
    assert sum(info.bucket_counts.values()) == 96
    assert set(info.bucket_counts) == {"64x64", "64x96", "96x64"}
    assert info.latent_channels == 4 and info.latent_downsample == 8
    assert info.latent_dtype == "bfloat16"
    assert (info.text_dim, info.pooled_dim, info.t5_dim, info.context_dim) == (16, 8, 24, 24)
    assert info.scaling_factor == pytest.approx(0.13) and info.shift_factor == pytest.approx(0.06)
    assert info.latent_size("64x96") == (8, 12)
    assert set(info.empty_prompt) == {"hidden_states", "pooled", "t5_hidden_states"}
    assert info.empty_prompt["pooled"].dtype == torch.bfloat16


def test_index_without_counts_reads_the_manifests(dataset):
    index_path = dataset.root / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"] = [s["name"] for s in index["shards"]]  # names only
    del index["latent"]  # the factors then come from the manifest
    index_path.write_text(json.dumps(index))
    loaded = load_dataset_index(dataset.root)
    assert loaded.num_samples == 96 and loaded.scaling_factor == 0.5
    assert loaded.shift_factor == 0.25
    assert loaded.shards[0].bucket_counts


def test_missing_scaling_factor_is_a_clear_error(dataset):
    for path in [dataset.root / "index.json", *dataset.root.glob("*.manifest.json")]:
        data = json.loads(path.read_text())
        data.pop("latent", None)
        path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="scaling_factor"):
        load_dataset_index(dataset.root)


def test_missing_index_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        load_dataset_index(tmp_path)


def test_config_validation():
    with pytest.raises(ConfigError, match="data.batch_size"):
        from_dict(DataConfig, {"batch_size": 0}, "data")
    with pytest.raises(ConfigError, match="max_text_tokens"):
        DataConfig(max_text_tokens=0)
    with pytest.raises(ConfigError, match="shuffle_buffer"):
        DataConfig(shuffle_buffer=-1)
    with pytest.raises(ConfigError, match="data.path"):
        build_train_loader(DataConfig(), 0, 1, 0)


def test_more_slots_than_shards_still_sees_every_sample_once(make_dataset, caplog):
    """3 shards for 2 ranks x 2 workers: some slots read nothing in an epoch (said so), and
    every sample still comes exactly once per epoch."""
    data = make_dataset(num_shards=3, per_shard=4, buckets=((64, 64),))
    config = DataConfig(path=str(data.root), batch_size=2, num_workers=2)
    with caplog.at_level("WARNING"):
        loaders = [build_train_loader(config, r, 2, 0) for r in range(2)]
    assert any("3 shards for 4 reading slots" in r.getMessage() for r in caplog.records)
    seen, _ = step_until_floor(loaders, 3, max_steps=40)
    for epoch in range(3):
        assert {k for e, k in seen if e == epoch} == data.keys
    assert max(seen.values()) == 1


def test_empty_shards_are_left_out_and_epochs_still_finish(make_dataset):
    from scaletrain.data.loader import merge_states

    data = make_dataset(num_shards=4, per_shard=[8, 0, 8, 8])
    index = load_dataset_index(data.root)
    assert [s.name for s in index.shards] == ["000000.tar", "000002.tar", "000003.tar"]
    config = DataConfig(path=str(data.root), batch_size=4, num_workers=0)
    loader = build_train_loader(config, 0, 1, 0)
    it = iter(loader)
    for _ in range(12):  # 24 samples, 6 batches an epoch
        next(it)
    assert floor_of(merge_states([loader.state_dict()])) >= 1
