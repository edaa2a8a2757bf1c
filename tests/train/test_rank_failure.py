"""A rank that dies (SIGKILL) or stops (SIGSTOP) under the local launcher: the whole job
ends within train.dist_timeout_s with EXIT_REQUEUE and a message naming the rank, and the
same command then resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from scaletrain.core import run_dir as ck
from scaletrain.core.dist_env import EXIT_REQUEUE

from .conftest import explain, run_train, start_train
from .test_multiprocess import _step_dir, _wait_for

pytestmark = pytest.mark.slow

TIMEOUT_S = 20  # train.dist_timeout_s of these runs: the bound on ending the job
OVERRIDES = ["train.max_steps=8", "checkpoint.every=1", "checkpoint.keep_last=100",
             f"train.dist_timeout_s={TIMEOUT_S}"]


def _rank_pid(run_dir, rank: int) -> int:
    return int((ck.heartbeat_dir(run_dir) / f"rank_{rank}").read_text().split()[1])


def _break_rank_and_resume(run_dir, log, sig: int, reference):
    proc = start_train(run_dir, OVERRIDES, log_path=log)
    try:
        reached = _wait_for(lambda: ck.is_complete(_step_dir(run_dir, 3)), 420, proc)
        assert reached, log.read_text()[-5000:]
        os.kill(_rank_pid(run_dir, 1), sig)
        t0 = time.monotonic()
        # Bounded: the launcher's watchdog, or rank 0's collective timeout, ends it.
        status = proc.wait(timeout=3 * TIMEOUT_S + 30)
        ended_after = time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        os.kill(_rank_pid(run_dir, 1), signal.SIGCONT)
        proc.wait()
        raise AssertionError(f"job still running after {3 * TIMEOUT_S + 30} s") from None
    text = log.read_text()
    assert status == EXIT_REQUEUE, text[-5000:]
    assert not ck.is_complete(_step_dir(run_dir, 8)), "broke the rank too late to test resume"
    # The resume needs no short timeout (a busy CI machine must not trip it).
    resumed = run_train(run_dir, OVERRIDES[:-1])
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed from" in resumed.stderr
    _assert_same_as_reference(run_dir, reference)
    return text, ended_after


def _assert_same_as_reference(run_dir, reference):
    import torch

    from scaletrain.export.consolidate import consolidate_ema, consolidate_model

    for consolidate in (consolidate_model, consolidate_ema):
        a, b = consolidate(_step_dir(reference, 8)), consolidate(_step_dir(run_dir, 8))
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{consolidate.__name__}: {k} differs"


def test_sigkill_of_one_rank_ends_the_job_for_a_requeue(zero2_reference_run, tmp_path):
    text, _ = _break_rank_and_resume(tmp_path / "run", tmp_path / "killed.log", signal.SIGKILL,
                                     zero2_reference_run)
    lines = [x for x in text.splitlines() if "rank 1 died" in x]
    assert lines and "exit status 137, SIGKILL" in lines[0], text[-5000:]
    assert "requeue" in lines[0]


def test_sigstop_of_one_rank_ends_the_job_for_a_requeue(zero2_reference_run, tmp_path):
    text, _ = _break_rank_and_resume(tmp_path / "run", tmp_path / "stopped.log", signal.SIGSTOP,
                                     zero2_reference_run)
    lines = [x for x in text.splitlines() if "rank 1 stopped making progress" in x]
    assert lines, text[-5000:]
