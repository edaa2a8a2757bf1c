"""`scaletrain submit` on a real SLURM cluster: training, preemption + requeue, job arrays.

Every job goes through the command line, as a user would submit it, and is watched through
squeue/sacct. Two CPU tasks fill the 2-CPU test node, so jobs run one after another.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaletrain.core.run_dir import find_latest
from scaletrain.export.consolidate import consolidate_ema, consolidate_model
from scaletrain.launch.records import read_job_records
from scaletrain.launch.slurm_state import accounting_states, live_state, wait_for_terminal

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# A tiny 2-rank ZeRO-2 bf16 run on the toy model and generated data (no shards needed); a
# checkpoint every 2 steps gives the preemption test a moment to act while the run is still
# going.
STEPS = 14


def train_yaml(steps: int) -> str:
    return f"""\
seed: 0
model: {{arch: toy, in_channels: 4, sample_size: 8, pooled_projection_dim: 16, width: 64}}
data: {{batch_size: 4, num_workers: 0, synthetic: {{enabled: true}}}}
diffusion: {{objective: eps, schedule: cosine}}
train:
  max_steps: {steps}
  lr: 1.0e-3
  warmup_steps: 2
  zero_stage: 2
  bf16: true
  progress_bar: false
ema: {{enabled: true, schedule: power, sigma_rel: 0.1}}
checkpoint: {{every: 2, keep_last: 50}}
logging: {{every: 1, wandb_mode: disabled}}
"""


TRAIN_YAML = train_yaml(STEPS)
CPU_TASKS = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "60"]
JOB_TIMEOUT = 600  # failure detection only; jobs take ~1 min on an idle 2-core machine


def _env() -> dict[str, str]:
    env = dict(os.environ)  # carries SLURM_CONF from the cluster fixture
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = "1"  # two ranks share two cores
    env["WANDB_MODE"] = "offline"
    return env


def scaletrain(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaletrain.cli", *map(str, argv)],
                          env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.fixture(scope="module")
def train_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slurm_config") / "tiny.yaml"
    path.write_text(TRAIN_YAML)
    return path


def submit_training(run_dir: Path, config: Path, *extra: str, tasks=tuple(CPU_TASKS)) -> str:
    proc = scaletrain("submit", config, "--run-dir", run_dir, *tasks, *extra)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def job_logs(run_dir: Path, chars: int = 4000) -> str:
    """Every task's log (the last ``chars`` characters of each), for assertions and failures."""
    parts = []
    for path in sorted((run_dir / "slurm").glob("*/*_log.*")):
        parts.append(f"--- {path}\n{path.read_text(errors='replace')[-chars:]}")
    return "\n".join(parts)


def wait_completed(job_id: str, run_dir: Path) -> None:
    state = wait_for_terminal(job_id, timeout=JOB_TIMEOUT)
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{job_logs(run_dir)}"


def wait_for_checkpoint(job_id: str, run_dir: Path) -> None:
    """Until the job's first complete checkpoint: training is under way."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while find_latest(run_dir) is None:
        assert live_state(job_id) is not None, f"job ended early\n{job_logs(run_dir)}"
        assert time.monotonic() < deadline, f"no checkpoint yet\n{job_logs(run_dir)}"
        time.sleep(0.2)


def final_weights(run_dir: Path):
    latest = find_latest(run_dir)
    assert latest is not None, f"no complete checkpoint in {run_dir}\n{job_logs(run_dir)}"
    return latest, consolidate_model(latest), consolidate_ema(latest)


def assert_same_final_weights(run_dir: Path, ref_dir: Path) -> None:
    """The final checkpoints of two runs hold the same weights and EMA, bit for bit."""
    import torch

    ref_latest, ref_model, ref_ema = final_weights(ref_dir)
    latest, model, ema = final_weights(run_dir)
    assert latest.name == ref_latest.name
    assert model.keys() == ref_model.keys() and ema.keys() == ref_ema.keys()
    for name in ref_model:
        assert torch.equal(model[name], ref_model[name]), f"weights differ: {name}"
    for name in ref_ema:
        assert torch.equal(ema[name], ref_ema[name]), f"EMA differs: {name}"


@pytest.fixture(scope="module")
def uninterrupted_run(slurm_cluster, train_config, tmp_path_factory):
    """(a) A 2-task CPU training job submitted with `scaletrain submit`, run to completion."""
    run_dir = tmp_path_factory.mktemp("slurm_uninterrupted") / "run"
    proc = scaletrain("submit", train_config, "--run-dir", run_dir, *CPU_TASKS)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    # A second submission for the same run directory is refused while the first is alive.
    again = scaletrain("submit", train_config, "--run-dir", run_dir, *CPU_TASKS)
    wait_completed(job_id, run_dir)
    return run_dir, job_id, proc.stdout, again


def test_training_job_completes_and_leaves_a_checkpoint(uninterrupted_run):
    run_dir, job_id, stdout, again = uninterrupted_run
    latest, model, ema = final_weights(run_dir)
    assert latest.name == f"step_{STEPS:09d}"
    assert model and ema
    # The run directory records the job, the resolved config and the code.
    job_dir = run_dir / "slurm" / job_id
    assert (job_dir / "config.yaml").is_file()
    assert (job_dir / "code.tar.gz").is_file()
    code = json.loads((job_dir / "code.json").read_text())
    assert code["files"] > 10
    events = [(r["event"], r.get("restart")) for r in read_job_records(run_dir)]
    assert events == [("submitted", None), ("started", 0), ("completed", 0)], events
    started = [r for r in read_job_records(run_dir) if r["event"] == "started"][0]
    assert started["world_size"] == 2
    # Both ranks ran under SLURM (one log per task), and the command said where to look.
    assert (job_dir / f"{job_id}_0_log.err").is_file()
    assert (job_dir / f"{job_id}_1_log.err").is_file()
    assert str(job_dir / f"{job_id}_0_log.out") in stdout
    assert re.search(r"^  wandb +: ", stdout, re.M), stdout  # the run's name and dir, or off
    assert accounting_states(job_id, all_runs=True) == ["COMPLETED"]
    # The duplicate submission made while the job was alive was refused.
    assert again.returncode == 2 and f"job {job_id}" in again.stderr, again.stderr


def test_preempted_job_requeues_resumes_and_matches_the_uninterrupted_run(
        uninterrupted_run, train_config, tmp_path):
    """(b) SIGUSR1 mid-run (what SLURM sends before the time limit): checkpoint, requeue,
    resume; the final weights equal those of the uninterrupted run bit for bit."""
    run_dir = tmp_path / "run"
    job_id = submit_training(run_dir, train_config)
    wait_for_checkpoint(job_id, run_dir)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, env=_env())
    wait_completed(job_id, run_dir)

    records = read_job_records(run_dir)
    events = [(r["event"], r.get("restart")) for r in records]
    assert ("requeued", 0) in events, events  # rank 0 requeued it after the checkpoint
    assert ("started", 1) in events and events[-1] == ("completed", 1), events
    assert accounting_states(job_id, all_runs=True) == ["REQUEUED", "COMPLETED"]
    log = job_logs(run_dir)
    assert "resumed from" in log, log

    ref_dir, _, _, _ = uninterrupted_run
    assert_same_final_weights(run_dir, ref_dir)


def test_preprocessing_job_array_over_four_shards(slurm_cluster, tmp_path):
    """(c) A 4-shard raw dataset preprocessed by a 2-task array plus the index job;
    resubmitting after losing a shard redoes only that shard."""
    from scaletrain.data.synthetic import write_synthetic_shards

    raw = tmp_path / "raw"
    pattern = write_synthetic_shards(raw, num_shards=4, samples_per_shard=4, size=64)
    out = tmp_path / "latents"
    config = REPO / "configs" / "data" / "demo.yaml"
    argv = ["submit", config, "--preprocess", "--input", pattern, "--output", out,
            "--array-size", "2", "--gpus-per-node", "0", "--time", "30"]

    def run_array() -> tuple[str, str]:
        proc = scaletrain(*argv)
        assert proc.returncode == 0, proc.stderr
        match = re.search(r"preprocessing array (\d+) .* index job (\d+)", proc.stdout)
        assert match, proc.stdout
        array_id, index_id = match.groups()
        for job in (array_id, index_id):
            state = wait_for_terminal(job, timeout=JOB_TIMEOUT)
            assert state == "COMPLETED", f"job {job}: {state}\n{_preprocess_logs(out)}"
        return array_id, index_id

    array_id, _ = run_array()
    assert accounting_states(f"{array_id}_0") == ["COMPLETED"]
    assert accounting_states(f"{array_id}_1") == ["COMPLETED"]
    index = json.loads((out / "index.json").read_text())
    names = sorted(s["name"] for s in index["shards"])
    assert names == [f"{i:05d}.tar" for i in range(4)], index
    assert sum(s["num_samples"] for s in index["shards"]) > 0
    stamps = {n: (out / n).stat().st_mtime_ns for n in names}

    # Lose one shard's output (its manifest marks it complete): only it is redone.
    (out / "00002.tar").unlink()
    (out / "00002.manifest.json").unlink()
    run_array()
    index = json.loads((out / "index.json").read_text())
    assert sorted(s["name"] for s in index["shards"]) == names
    for name in names:
        changed = (out / name).stat().st_mtime_ns != stamps[name]
        assert changed == (name == "00002.tar"), name


def _preprocess_logs(out: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((out / "slurm").glob("*/*_log.*")))


def test_hand_written_sbatch_template_trains_and_requeues_itself(
        slurm_cluster, train_config, tmp_path):
    """slurm/train.sbatch, submitted by hand: srun + `scaletrain train`; on SIGUSR1 the
    tasks checkpoint and exit 75, and the script requeues the job, which resumes."""
    run_dir = tmp_path / "run"
    out = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0",
         "--cpus-per-task=1", "--time=60", f"--output={tmp_path}/job-%j.out",
         str(REPO / "slurm" / "train.sbatch"), str(train_config), str(run_dir)],
        env=_env(), capture_output=True, text=True, check=True, cwd=tmp_path,
    )
    job_id = out.stdout.strip().split(";")[0]
    log = tmp_path / f"job-{job_id}.out"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (run_dir / "checkpoints" / "latest").exists():
        assert live_state(job_id) is not None, log.read_text() if log.exists() else "no log"
        assert time.monotonic() < deadline, "no checkpoint yet"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, env=_env())
    state = wait_for_terminal(job_id, timeout=JOB_TIMEOUT)
    text = log.read_text()
    assert state == "COMPLETED", text
    assert accounting_states(job_id, all_runs=True) == ["REQUEUED", "COMPLETED"]
    assert "exit code 75" in text and f"requeuing job {job_id}" in text, text
    assert "restart 1" in text and "resumed from" in text, text
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:09d}"
