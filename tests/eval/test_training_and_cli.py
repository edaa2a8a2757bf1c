"""Evaluation end to end: in a real 2-rank training run (DeepSpeed ZeRO-2, the tiny U-Net,
real latent shards, the sharded EMA), through a resume at another world size, and through
`scaletrain eval` on 1 and 2 processes, on checkpoints and on an export.

What must hold: the values do not depend on the world size (each rank generates its share:
half of the samples on 2 ranks), the numbers logged in training are those `scaletrain eval`
computes on the same checkpoint, and the validation loss falls as the model trains.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from scaletrain.config import load_config
from scaletrain.eval.offline import evaluate_weights
from scaletrain.export.writer import export_checkpoint
from tests.support.tiny import REPO
from tests.train.conftest import explain, run_train, train_env
from tests.train.test_real_components import write_shards

pytestmark = pytest.mark.slow

CONFIG = REPO / "configs" / "train" / "demo.yaml"
EVERY = 2


def _eval_overrides(shards, inception, open_clip_dir, cache):
    return [
        f"data.path={shards}", "data.batch_size=2", "data.num_workers=0",
        "data.max_text_tokens=16", "train.bf16=false", "train.zero_stage=2", "train.lr=3e-3",
        "train.warmup_steps=0", "checkpoint.every=2", "checkpoint.keep_last=10",
        "logging.every=2", "logging.wandb_mode=disabled", "logging.diagnostics_every=0",
        f"preprocess.text_encoder.tiny.cache_dir={cache}",
        f"eval.every={EVERY}", "eval.holdout_shards=1", "eval.loss_samples=4",
        "eval.timesteps=4", "eval.num_samples=4", "eval.batch_size=2", "eval.steps=2", "eval.guidance_scale=2.0",
        f"eval.inception={inception}", "eval.fid_dims=64", "eval.clip_library=open_clip",
        f"eval.clip_model=local-dir:{open_clip_dir}",
    ]


def _rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "eval/seconds" in r}


def _cli_eval(target, overrides, nproc, out, step=None):
    cmd = [sys.executable, "-m", "scaletrain.cli", "eval", str(target), str(CONFIG), *overrides,
           "--nproc", str(nproc), "--out", str(out)]
    if step is not None:
        cmd += ["--step", str(step)]
    proc = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, explain(proc)
    return json.loads((out / "eval.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory, inception_weights, open_clip_dir):
    """3 training shards + 1 held out; 2 ranks to step 4 (evaluations at 2 and 4), then
    resumed on 1 rank to step 6 (evaluation at 6)."""
    root = tmp_path_factory.mktemp("eval_run")
    shards = write_shards(root / "shards", num_shards=4, per_shard=8)
    overrides = _eval_overrides(shards, inception_weights, open_clip_dir, root / "clip")
    run_dir = root / "run"
    first = run_train(run_dir, [*overrides, "train.max_steps=4"], config=CONFIG)
    assert first.returncode == 0, explain(first)
    second = run_train(run_dir, [*overrides, "train.max_steps=6", "train.grad_accum=2"],
                       nproc=1, config=CONFIG)
    assert second.returncode == 0, explain(second)
    assert "world size 2 -> 1" in second.stderr
    return run_dir, overrides


def test_training_logs_every_metric_under_eval(run):
    run_dir, _ = run
    rows = _rows(run_dir)
    assert sorted(rows) == [2, 4, 6]
    for row in rows.values():
        for key in ("eval/loss", "eval/loss_raw", "eval/fid", "eval/clip_score",
                    "eval/time_fraction", "eval/seconds", "eval/loss_t/0.125",
                    "eval/loss_raw_t/0.875"):
            assert row.get(key) is not None, (key, sorted(row))
        assert 0 < row["eval/time_fraction"] < 1
        assert row["eval/fid"] >= 0 and 0 <= row["eval/clip_score"] <= 100
        assert row["eval/num_samples"] == 4 and row["eval/loss_samples"] == 4
    # The reference statistics were computed once (from the held-out latents) and cached.
    with np.load(run_dir / "eval" / "fid_reference.npz") as data:
        cached = json.loads(str(data["meta"]))
    assert cached["count"] == 8 and "held-out" in cached["source"]


def test_validation_loss_falls_as_the_model_trains(run):
    rows = _rows(run[0])
    assert rows[6]["eval/loss_raw"] < rows[2]["eval/loss_raw"]
    assert rows[6]["eval/loss"] < rows[2]["eval/loss"]


def _assert_same(result, logged):
    for key, value in result["metrics"].items():
        if key.startswith("loss"):
            assert value == logged[f"eval/{key}"], key  # exactly: same batches, same sums
        else:
            assert value == pytest.approx(logged[f"eval/{key}"], rel=1e-6, abs=1e-9), key


def test_values_do_not_depend_on_the_world_size(run, tmp_path):
    """Step 2 was evaluated in training on 2 ranks, step 6 on 1 rank after the resume:
    `scaletrain eval` gives the same numbers on the other number of processes, for the
    checkpoint of step 2 (1 process) and the EMA export of step 6 (2 processes, each
    generating half of the samples)."""
    run_dir, overrides = run
    rows = _rows(run_dir)
    result = _cli_eval(run_dir, overrides, 1, tmp_path / "step2", step=2)
    assert result["weights"]["step"] == 2 and result["weights"]["kind"] == "checkpoint"
    assert result["counts"]["generated_per_rank"] == [4]
    assert set(result["metrics"]) >= {"loss", "loss_raw", "fid", "clip_score"}
    _assert_same(result, rows[2])

    export_checkpoint(run_dir, tmp_path / "export", step=6, weights="ema")
    result = _cli_eval(tmp_path / "export", overrides, 2, tmp_path / "step6")
    assert result["weights"]["kind"] == "export" and result["weights"]["step"] == 6
    assert result["counts"]["generated_per_rank"] == [2, 2]
    assert result["settings"]["world_size"] == 2
    assert "loss_raw" not in result["metrics"]  # an export holds one set of weights
    _assert_same(result, rows[6])
    # An existing eval.json is not replaced without --overwrite.
    with pytest.raises(FileExistsError, match="eval.json: exists"):
        evaluate_weights(tmp_path / "export", load_config(CONFIG, overrides).eval,
                         out_dir=tmp_path / "step6")
