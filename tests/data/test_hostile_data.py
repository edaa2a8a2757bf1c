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


# --------------------------------------------------------------------------- preprocess input


def test_hostile_keys_are_recorded_never_copied(tmp_path, demo_cfg, image_bytes, write_tar,
                                                read_latent_shard):
    jpg = image_bytes()
    members = []
    for key in ("ok", "../evil", "/abs/olute", "a/../../up", "__dunder", "sub/__meta", "good"):
        members += [(f"{key}.jpg", jpg), (f"{key}.txt", b"a red square")]
    raw = write_tar(tmp_path / "raw" / "00000.tar", members)
    out = tmp_path / "out"
    summary = preprocess_shards(demo_cfg, str(raw), out)
    assert summary.samples_written == 2
    with tarfile.open(out / "00000.tar") as tf:
        names = tf.getnames()
    assert all(not n.startswith(("/", "..", "__")) and "/../" not in n and "/__" not in n
               for n in names), names
    assert sorted(read_latent_shard(out / "00000.tar")) == ["good", "ok"]
    ledger = [json.loads(line) for line in (out / sf.LEDGER_NAME).read_text().splitlines()]
    codes = {e["key"]: e["code"] for e in ledger}
    assert codes == {"../evil": "unsafe_key", "/abs/olute": "unsafe_key",
                     "a/../../up": "unsafe_key", "__dunder": "reserved_key",
                     "sub/__meta": "reserved_key"}
    # Every indexed sample is deliverable: the loader reads as many as the index counts.
    index = sf.read_index(out)
    assert index["num_samples"] == 2
    seen, loader = _epoch(out, batch_size=1)
    assert set(seen) == {"ok", "good"} and loader.metrics()["lost_samples"] == 0


@pytest.mark.parametrize("junk", [b"", b"<html><body>404 Not Found</body></html>\n" * 20],
                         ids=["zero_bytes", "html"])
def test_a_non_tar_input_fails_and_is_redone_once_the_real_file_is_back(
        tmp_path, demo_cfg, junk):
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=2, samples_per_shard=3)
    real = (tmp_path / "raw" / "00001.tar").read_bytes()
    (tmp_path / "raw" / "00001.tar").write_bytes(junk)
    out = tmp_path / "out"
    first = preprocess_shards(demo_cfg, pattern, out)
    assert first.shards_done == 1 and [f["shard"] for f in first.shards_failed] == ["00001"]
    assert "not a tar archive" in first.shards_failed[0]["reason"]
    assert not (out / "00001.manifest.json").exists()
    (tmp_path / "raw" / "00001.tar").write_bytes(real)  # the real file is put back
    again = preprocess_shards(demo_cfg, pattern, out)
    assert again.shards_done == 1 and again.samples_written == 3
    assert sf.read_index(out)["complete"] and sf.read_index(out)["num_samples"] == 6


def test_a_shard_whose_input_changed_is_redone(tmp_path, demo_cfg):
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=2, samples_per_shard=3)
    out = tmp_path / "out"
    preprocess_shards(demo_cfg, pattern, out)
    manifest = sf.read_json(out / "00000.manifest.json")
    raw0 = tmp_path / "raw" / "00000.tar"
    assert manifest["input"]["size_bytes"] == raw0.stat().st_size
    assert len(manifest["input"]["sha256"]) == 64
    # The input is replaced by another shard (other samples, other size).
    write_synthetic_shards(tmp_path / "raw2", num_shards=1, samples_per_shard=5)
    raw0.write_bytes((tmp_path / "raw2" / "00000.tar").read_bytes())
    again = preprocess_shards(demo_cfg, pattern, out)
    assert (again.shards_done, again.shards_already_complete) == (1, 1)
    assert sf.read_json(out / "00000.manifest.json")["num_samples"] == 5


def test_two_concurrent_preprocess_runs_on_one_output_cooperate(tmp_path):
    """Two real processes: the second must not delete the first's in-flight temporary; each
    shard is written by one of them, and the result is complete."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    write_synthetic_shards(tmp_path / "raw", num_shards=4, samples_per_shard=24)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "scaletrain.cli", "preprocess",
               str(repo / "configs" / "data" / "demo.yaml"), "--input",
               f"{tmp_path}/raw/{{00000..00003}}.tar", "--output", str(out),
               f"preprocess.text_encoder.tiny.cache_dir={tmp_path / 'cache'}",
               "preprocess.decode_workers=0", "preprocess.progress=false",
               "preprocess.batch_size=4"]
    first = subprocess.Popen(command, env=env, cwd=repo, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    try:
        while True:  # freeze the first run while it writes a shard
            assert first.poll() is None and time.monotonic() < deadline, "first ended early"
            if list(out.glob("*.tar.tmp-*")):
                os.kill(first.pid, signal.SIGSTOP)
                if list(out.glob("*.tar.tmp-*")):
                    break
                os.kill(first.pid, signal.SIGCONT)
            time.sleep(0.02)
        in_flight = list(out.glob("*.tar.tmp-*"))
        second = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True,
                                timeout=600)
        # The second run left the first's temporary alone.
        assert all(p.exists() for p in in_flight)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first_out = first.communicate(timeout=600)[0]
    assert first.returncode == 0, first_out
    assert second.returncode == 0, second.stdout + second.stderr
    assert "being written by another preprocess run" in second.stdout + second.stderr
    index = sf.read_index(out)
    assert index["complete"] and index["num_samples"] == 96
    assert not list(out.glob("*.tmp*"))
