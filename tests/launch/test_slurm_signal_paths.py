"""Who requeues a signalled training job, on a real cluster, with a light stand-in trainer.

The stand-in keeps the trainer's contract (scaletrain.train.signals.PreemptionFlag turns
SIGUSR1/SIGTERM into "checkpoint at the next step boundary, return 'preempted'"), without
DeepSpeed, so these paths cost seconds. The real trainer's preemption is tested end to end
in test_slurm_jobs.py.

- ``scontrol requeue`` (what SLURM preemption does): SIGTERM, checkpoint; SLURM requeues the
  job itself, so rank 0 must not requeue it a second time.
- ``scancel``: SIGTERM, checkpoint, and the job stays cancelled.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pytest

from scaletrain.config import load_config
from scaletrain.launch.records import read_job_records
from scaletrain.launch.slurm_state import accounting_states, live_state, wait_for_terminal
from scaletrain.launch.submit import submit_training

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# The job unpickles the stand-in below by value: this test module is not importable there.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class Outcome:
    status: str
    step: int


def standin_training(cfg, run_dir: Path) -> Outcome:
    """Count steps (0.2 s each), save {step} as a checkpoint when signalled or done."""
    import os

    from scaletrain.train.signals import PreemptionFlag

    rank = int(os.environ["RANK"])
    latest = run_dir / "checkpoints" / "latest.json"
    step = json.loads(latest.read_text())["step"] if latest.exists() else 0

    def save() -> None:
        if rank == 0:
            latest.parent.mkdir(parents=True, exist_ok=True)
            latest.write_text(json.dumps({"step": step}))

    with PreemptionFlag() as flag:
        while step < cfg.train.max_steps:
            time.sleep(0.2)
            step += 1
            if flag.is_set:
                save()
                return Outcome("preempted", step)
    save()
    return Outcome("completed", step)


def _start(run_dir: Path) -> str:
    cfg = load_config(None, ["train.max_steps=30", "slurm.gpus_per_node=0", "data.num_workers=0",
                             "slurm.tasks_per_node=2", "slurm.time_min=60"])
    job_id = submit_training(cfg, run_dir, entry=standin_training).job_id
    deadline = time.monotonic() + 120
    # Signal only once the stand-in runs (its "started" record precedes the call).
    while not any(r["event"] == "started" for r in read_job_records(run_dir)):
        assert time.monotonic() < deadline, "job did not start"
        time.sleep(0.2)
    time.sleep(2)
    return job_id


def _saved_step(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]


def test_slurm_requeue_checkpoints_first_and_requeues_once(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job_id = _start(run_dir)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    assert wait_for_terminal(job_id, timeout=300) == "COMPLETED"
    assert accounting_states(job_id, all_runs=True) == ["REQUEUED", "COMPLETED"]
    events = [(r["event"], r.get("restart")) for r in read_job_records(run_dir)]
    # Rank 0 saw the job already on its way back to the queue and left it to SLURM.
    assert events == [("submitted", None), ("started", 0), ("preempted", 0), ("started", 1),
                      ("completed", 1)], events
    assert _saved_step(run_dir) == 30


def test_scancel_checkpoints_and_stays_cancelled(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job_id = _start(run_dir)
    subprocess.run(["scancel", job_id], check=True)
    assert wait_for_terminal(job_id, timeout=120) == "CANCELLED"
    time.sleep(3)  # a wrongly requeued job would be pending again by now
    assert live_state(job_id) is None
    assert accounting_states(job_id, all_runs=True) == ["CANCELLED"]
    events = [r["event"] for r in read_job_records(run_dir)]
    assert events == ["submitted", "started", "preempted"], events
    assert 0 < _saved_step(run_dir) < 30  # the work done so far was saved
