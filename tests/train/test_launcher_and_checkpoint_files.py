"""Local launcher semantics and checkpoint-directory bookkeeping (no DeepSpeed)."""

from __future__ import annotations

import sys
import time

import pytest

from scaletrain.core import run_dir as ck
from scaletrain.core.config_base import ConfigError
from scaletrain.core.dist_env import EXIT_REQUEUE
from scaletrain.launch.local import launch_local
from scaletrain.train.checkpoint import check_same_stage, prune

WORKER = """
import os, sys, time
rank = int(os.environ["RANK"])
assert os.environ["WORLD_SIZE"] == sys.argv[1] and os.environ["MASTER_ADDR"] == "127.0.0.1"
assert int(os.environ["MASTER_PORT"]) > 0 and os.environ["LOCAL_RANK"] == str(rank)
mode = sys.argv[2]
if mode == "ok":
    sys.exit(0)
if mode == "requeue":
    sys.exit(75 if rank == 0 else 0)
if mode == "fail" and rank == 1:
    sys.exit(3)
time.sleep(60)  # the launcher must kill this survivor
"""


def _launch(mode: str, nproc: int = 3) -> int:
    return launch_local([str(nproc), mode], nproc, program=[sys.executable, "-c", WORKER],
                        poll_s=0.05)


def test_all_ok_and_requeue_statuses():
    assert _launch("ok") == 0
    assert _launch("requeue") == EXIT_REQUEUE


def test_one_failure_kills_the_rest_and_is_reported():
    t0 = time.monotonic()
    assert _launch("fail") == 3
    assert time.monotonic() - t0 < 30  # survivors were killed, not waited for


def _fake_checkpoint(run_dir, step, complete=True):
    path = ck.checkpoints_dir(run_dir) / ck.step_dir_name(step)
    path.mkdir(parents=True)
    if complete:
        (path / ck.STATE).write_text("{}")
        (path / ck.MARKER).write_text(f"{step}\n")
    return path


def test_half_written_checkpoint_is_ignored(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20, complete=False)  # crashed before its marker
    (ck.checkpoints_dir(tmp_path) / ".tmp_step_000000030").mkdir()
    assert ck.find_latest(tmp_path).name == "step_000000010"
    # A stale `latest` file does not win over the scan either.
    (ck.checkpoints_dir(tmp_path) / ck.LATEST).write_text("step_000000020\n")
    assert ck.find_latest(tmp_path).name == "step_000000010"
    assert ck.resolve_checkpoint(tmp_path).name == "step_000000010"


def test_prune_keeps_newest_complete(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    stale = ck.checkpoints_dir(tmp_path) / ".tmp_step_000000002"
    stale.mkdir()
    prune(tmp_path, keep_last=2)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == [
        "step_000000003", "step_000000004"]
    assert not stale.exists()


def test_resume_needs_the_same_zero_stage(tmp_path):
    saved = {"world_size": 2, "zero_stage": 2}
    check_same_stage(tmp_path, saved, 2)
    with pytest.raises(ConfigError, match="train.zero_stage: .*ZeRO-2.*ZeRO-3"):
        check_same_stage(tmp_path, saved, 3)


def test_prune_leaves_a_checkpoint_that_is_being_read(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    with ck.reading(ck.checkpoints_dir(tmp_path) / "step_000000001"):
        prune(tmp_path, keep_last=1)
        assert [p.name for p in ck.complete_checkpoints(tmp_path)] == [
            "step_000000001", "step_000000003"]
    prune(tmp_path, keep_last=1)  # the read is over: pruned on the next save
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_000000003"]
    with pytest.raises(ck.CheckpointGone, match="was pruned"):
        with ck.reading(ck.checkpoints_dir(tmp_path) / "step_000000002"):
            pass
