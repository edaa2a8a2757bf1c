"""Hostile data (issue 14): bit rot inside latent shards, truncated indexes."""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter

import pytest

from scaletrain.data import shard_format as sf
from scaletrain.data.loader import DataConfig, build_train_loader
from scaletrain.data.loader.dataset_index import load_dataset_index
from scaletrain.data.preprocess.pipeline import preprocess_shards
from scaletrain.data.synthetic import write_synthetic_shards


def _epoch(root, batch_size=2):
    config = DataConfig(path=str(root), batch_size=batch_size, num_workers=0,
                        shuffle_buffer=0)
    loader = build_train_loader(config, 0, 1, 0)
    seen: Counter[str] = Counter()
    it = iter(loader)
    while loader.epoch == 0:
        batch = next(it)
        seen.update(k for k, e in zip(batch["keys"], batch["epochs"]) if e == 0)
    return seen, loader


def test_bit_rot_in_a_latent_member_is_caught_by_its_checksum(tmp_path, demo_cfg, caplog):
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=2, samples_per_shard=6)
    out = tmp_path / "out"
    preprocess_shards(demo_cfg, pattern, out)
    manifest = sf.read_json(out / "00000.manifest.json")
    checksums = manifest[sf.MEMBER_CHECKSUMS]
    assert sf.read_index(out)[sf.MEMBER_CHECKSUMS] is True
    with tarfile.open(out / "00000.tar") as tf:
        members = [m for m in tf.getmembers() if m.isreg()]
        # Every member is recorded with the checksum of its bytes.
        assert {m.name for m in members} == set(checksums)
        for m in members:
            assert sf.member_checksum(tf.extractfile(m).read()) == checksums[m.name]
        victim = next(m for m in members if m.name.endswith(sf.LATENT_EXT))
    key = victim.name.split(".")[0]
    # Flip bytes in the tensor data at the end of the member: tar and safetensors headers
    # stay intact (the fp16 value 0x7BFF is 65504, what the attack injected).
    with open(out / "00000.tar", "r+b") as fh:
        fh.seek(victim.offset_data + victim.size - 8)
        fh.write(b"\xff\x7b" * 4)
    with caplog.at_level(logging.WARNING):
        seen, loader = _epoch(out)
    assert key not in seen and len(seen) == 11 and max(seen.values()) == 1
    assert loader.metrics()["bad_samples"] == 1
    assert [k.rsplit("/", 1)[-1] for k in loader.quarantined()] == [key]
    named = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert len(named) == 1 and "00000.tar" in named[0] and "checksum" in named[0]


def test_a_dataset_without_member_checksums_still_loads_and_says_so(tmp_path, demo_cfg, caplog):
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=1, samples_per_shard=4)
    out = tmp_path / "out"
    preprocess_shards(demo_cfg, pattern, out)
    # As written before checksums existed: neither the index flag nor the manifests' map.
    index = sf.read_json(out / sf.INDEX_NAME)
    del index[sf.MEMBER_CHECKSUMS]
    (out / sf.INDEX_NAME).write_text(json.dumps(index))
    manifest = sf.read_json(out / "00000.manifest.json")
    del manifest[sf.MEMBER_CHECKSUMS]
    (out / "00000.manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO):
        seen, loader = _epoch(out)
    assert len(seen) == 4 and loader.metrics()["bad_samples"] == 0
    lines = [r for r in caplog.records if "without per-member checksums" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO


def test_a_truncated_index_names_the_file_and_the_reason(tmp_path, demo_cfg):
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=1, samples_per_shard=2)
    out = tmp_path / "out"
    preprocess_shards(demo_cfg, pattern, out)
    text = (out / sf.INDEX_NAME).read_text()
    (out / sf.INDEX_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError) as info:
        load_dataset_index(out)
    message = str(info.value)
    assert "\n" not in message
    assert str(out / sf.INDEX_NAME) in message and "not valid JSON" in message
