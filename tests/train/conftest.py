"""Helpers for engine tests: run `scaletrain train` as real local multi-process jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYNTHETIC = REPO / "configs" / "train" / "synthetic.yaml"


def train_command(run_dir, overrides=(), nproc: int = 2, config=SYNTHETIC) -> list[str]:
    return [sys.executable, "-m", "scaletrain.cli", "train", str(config), "--run-dir",
            str(run_dir), "--nproc", str(nproc), "train.progress_bar=false", *overrides]


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks on 2 shared cores; also keeps CPU math repeatable
    return env


def run_train(run_dir, overrides=(), nproc: int = 2, timeout: float = 600, config=SYNTHETIC):
    """Run a training job to completion; return the CompletedProcess (output captured)."""
    return subprocess.run(train_command(run_dir, overrides, nproc, config), env=train_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def start_train(run_dir, overrides=(), nproc: int = 2, config=SYNTHETIC, log_path=None):
    """Start a training job in its own process group (so a test can kill all of it)."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(train_command(run_dir, overrides, nproc, config), env=train_env(),
                            stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)


def explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def zero2_reference_run(tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-2 run of 8 steps with a checkpoint after every step."""
    run_dir = tmp_path_factory.mktemp("zero2_reference")
    proc = run_train(run_dir, ["train.max_steps=8", "checkpoint.every=1",
                               "checkpoint.keep_last=100"])
    assert proc.returncode == 0, explain(proc)
    return run_dir
