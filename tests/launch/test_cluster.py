"""The test cluster itself: srun places tasks, scaletrain.core.dist_env reads them, sacct records jobs."""

from __future__ import annotations

import sys

import pytest

from scaletrain.launch.slurm_state import wait_for_terminal

pytestmark = pytest.mark.slurm

PRINT_PLACE = (
    "from scaletrain.core.dist_env import dist_env_from_environ as f; d = f(); "
    "print(d.source, d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr, "
    "d.master_port)"
)


def test_srun_tasks_read_their_place_from_slurm(slurm_cluster):
    out = slurm_cluster.run("srun", "-N1", "-n2", sys.executable, "-c", PRINT_PLACE)
    rows = sorted(line.split() for line in out.splitlines() if line.strip())
    assert [r[:5] for r in rows] == [["slurm", "0", "2", "0", "2"], ["slurm", "1", "2", "1", "2"]]
    assert rows[0][5] == rows[1][5] == slurm_cluster.hostname  # first (only) node is master
    assert rows[0][6] == rows[1][6]  # every task derives the same port


def test_sacct_sees_finished_jobs(slurm_cluster, tmp_path):
    out = slurm_cluster.run("sbatch", "--parsable", "-n", "1", f"--output={tmp_path}/o.txt",
                            "--wrap", "exit 3")
    job_id = out.strip().split(";")[0]
    assert wait_for_terminal(job_id, timeout=60) == "FAILED"
