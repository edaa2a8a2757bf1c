"""What `scaletrain submit --dry-run` shows an HPC user: cores and threads from the loader's
workers, failure-visible distributed settings, the training command, the array line, and a
warning when the signal delay cannot cover one checkpoint save."""

from __future__ import annotations

import subprocess
import sys

from .test_slurm_jobs import REPO

SYNTHETIC = REPO / "configs" / "train" / "synthetic.yaml"


def _submit(*argv: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "scaletrain.cli", "submit", *map(str, argv)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_training_script_shows_cores_threads_timeouts_and_the_command(tmp_path):
    proc = _submit(SYNTHETIC, "--run-dir", tmp_path / "run", "--nodes", "2",
                   "--gpus-per-node", "0", "--tasks-per-node", "2", "data.num_workers=3",
                   "train.dist_timeout_s=900", "--exclusive", "--mem", "64G", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = [line.removeprefix("#   ") for line in proc.stdout.splitlines()
              if line.startswith("#   ")]
    assert "#SBATCH --cpus-per-task=4" in script  # 3 loader workers + the trainer
    assert "export OMP_NUM_THREADS=1  # cpus-per-task minus loader workers" in script
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
    assert any("train.dist_timeout_s=900" in line for line in script)
    assert any("NCCL_SOCKET_IFNAME" in line and "NCCL_IB_HCA" in line for line in script)
    assert "#SBATCH --exclusive" in script and "#SBATCH --mem=64G" in script
    echo = [line for line in script if line.startswith("echo ")]
    assert echo and f"scaletrain train {SYNTHETIC} --run-dir {tmp_path / 'run'}" in echo[0]
    assert "slurm.nodes=2" in echo[0]
    assert proc.stderr == ""  # the toy model's checkpoint fits the default signal delay


def test_explicit_cpus_per_task_wins_and_threads_follow(tmp_path):
    proc = _submit(SYNTHETIC, "--run-dir", tmp_path / "run", "--gpus-per-node", "0",
                   "--cpus-per-task", "8", "data.num_workers=2", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "#   #SBATCH --cpus-per-task=8" in proc.stdout
    assert "#   export OMP_NUM_THREADS=6  # cpus-per-task minus loader workers" in proc.stdout


def test_preprocessing_preview_shows_its_array_line(tmp_path):
    from scaletrain.data.synthetic import write_synthetic_shards

    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=3, samples_per_shard=1,
                                     size=16)
    proc = _submit(REPO / "configs" / "data" / "demo.yaml", "--preprocess", "--input", pattern,
                   "--output", tmp_path / "out", "--array-size", "3", "--gpus-per-node", "0",
                   "slurm.array_parallelism=2", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "#   #SBATCH --array=0-2%2" in proc.stdout


def test_signal_delay_too_short_for_the_checkpoint_warns_in_one_line(tmp_path):
    config = REPO / "configs" / "train" / "mmdit_8b.yaml"
    slow = _submit(config, "--run-dir", tmp_path / "run", "--signal-delay", "120",
                   "slurm.checkpoint_write_mb_s=500", "--dry-run")
    assert slow.returncode == 0, slow.stderr
    lines = slow.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: slurm.signal_delay_s=120"), lines
    assert "checkpoint_write_mb_s=500" in lines[0]
    fast = _submit(config, "--run-dir", tmp_path / "run", "--signal-delay", "120",
                   "slurm.checkpoint_write_mb_s=100000", "--dry-run")
    assert fast.returncode == 0 and fast.stderr == "", fast.stderr
