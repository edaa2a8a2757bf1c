"""End to end through a real S3 server on 127.0.0.1 (moto, tests/support/s3_server.py):
`scaletrain preprocess` from S3 to S3 (the same bytes as a local run; a rerun skips what is
there), then `scaletrain train` from S3 on 2 ranks (DeepSpeed over gloo, fp32), resumed on
1 rank: one epoch, every sample exactly once."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch

from scaletrain.cli import main
from scaletrain.core import run_dir as ck
from scaletrain.data.loader import merge_states
from scaletrain.data.synthetic import write_synthetic_shards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEMO_DATA = str(REPO / "configs" / "data" / "demo.yaml")
DEMO_TRAIN = str(REPO / "configs" / "train" / "demo.yaml")


def _train(run_dir, overrides, nproc):
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "scaletrain.cli", "train", DEMO_TRAIN, "--run-dir",
           str(run_dir), "--nproc", str(nproc), "train.progress_bar=false", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def test_preprocess_s3_to_s3_then_train_from_s3_and_resume(s3_server, tmp_path, tiny_cache,
                                                           capsys):
    bucket = s3_server.new_bucket()
    fs = fsspec.filesystem("s3")
    write_synthetic_shards(tmp_path / "raw", num_shards=3, samples_per_shard=12)
    for name in ("00000.tar", "00001.tar"):  # 00002 arrives later
        fs.put_file(str(tmp_path / "raw" / name), f"{bucket}/raw/{name}")
    overrides = [f"preprocess.text_encoder.tiny.cache_dir={tiny_cache}", "preprocess.progress=false"]
    latents = f"s3://{bucket}/latents"
    argv = ["preprocess", DEMO_DATA, "--input", f"s3://{bucket}/raw/{{00000..00001}}.tar",
            "--output", latents, *overrides]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 written" in printed and "24 written" in printed and "(complete)" in printed
    assert "bytes per sample: json" in printed and "100M samples" in printed
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/latents"))
    assert "index.json" in names and not [n for n in names if ".tmp" in n]
    index = json.loads(fs.cat_file(f"{bucket}/latents/index.json"))
    assert index["complete"] and index["num_samples"] == 24

    # The same input preprocessed locally gives the same shard bytes.
    local_out = tmp_path / "local"
    assert main(["preprocess", DEMO_DATA, "--input", f"{tmp_path}/raw/{{00000..00001}}.tar",
                 "--output", str(local_out), *overrides]) == 0
    for name in ("00000.tar", "00001.tar"):
        remote = hashlib.sha256(fs.cat_file(f"{bucket}/latents/{name}")).hexdigest()
        assert remote == hashlib.sha256((local_out / name).read_bytes()).hexdigest()
    capsys.readouterr()
    # A rerun finds every shard there and writes none.
    assert main(argv) == 0
    assert "2 already complete" in capsys.readouterr().out

    # Train from S3: 2 ranks x batch 2 for 3 steps, then 1 rank x 2 micro-batches for 3:
    # 24 samples, exactly the one epoch the two shards hold.
    run_dir = tmp_path / "run"
    common = [f"data.path={latents}", "data.batch_size=2", "data.num_workers=1",
              "train.bf16=false", "logging.wandb_mode=disabled", "logging.every=1",
              "logging.diagnostics_every=0", "checkpoint.every=3", "ema.enabled=false"]
    _train(run_dir, [*common, "train.max_steps=3"], nproc=2)
    resumed = _train(run_dir, [*common, "train.max_steps=6", "train.grad_accum=2"], nproc=1)
    assert "world size 2 -> 1" in resumed.stderr
    ckpt = ck.find_latest(run_dir)
    states = [torch.load(p, weights_only=False) for p in ck.rank_files(ckpt, "data")]
    state = merge_states(states)
    (source,) = state["sources"].values()
    # All 24 positions consumed and 24 samples handed out: none twice, none missed.
    assert source["floor"] == 1 and source["epochs"] == {}
    assert sum(m["samples"] for m in state["source_metrics"].values()) == 24
    assert state["metrics"]["lost_samples"] == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/read_retries"] == 0 and rows[-1]["step"] == 6

    # The dataset grows: a third raw shard is preprocessed into the same output (the two
    # there are skipped), and the run resumes at the same world size with it.
    fs.put_file(str(tmp_path / "raw" / "00002.tar"), f"{bucket}/raw/00002.tar")
    grow = ["preprocess", DEMO_DATA, "--input", f"s3://{bucket}/raw/{{00000..00002}}.tar",
            "--output", latents, *overrides]
    assert main(grow) == 0
    assert "1 written, 2 already complete" in capsys.readouterr().out
    grown = _train(run_dir, [*common, "train.max_steps=7", "train.grad_accum=2"], nproc=1)
    assert "1 new shards join at its epoch 1 (00002.tar)" in grown.stderr
    state = merge_states([torch.load(p, weights_only=False)
                          for p in ck.rank_files(ck.find_latest(run_dir), "data")])
    (source,) = state["sources"].values()
    assert [start for start, _, _ in source["lists"]] == [1]  # epoch 1 reads all three
    assert sum(m["samples"] for m in state["source_metrics"].values()) == 28
