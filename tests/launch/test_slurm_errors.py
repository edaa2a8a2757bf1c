"""A job sbatch refuses: SLURM's own message in one or two lines, status 2, no traceback."""

from __future__ import annotations

import pytest

from .test_slurm_jobs import REPO, scaletrain

pytestmark = pytest.mark.slurm


def test_bad_partition_prints_slurms_message_without_a_traceback(slurm_cluster, tmp_path):
    config = REPO / "configs" / "train" / "synthetic.yaml"
    proc = scaletrain("submit", config, "--run-dir", tmp_path / "run", "--gpus-per-node", "0",
                      "--tasks-per-node", "1", "--partition", "no-such-partition")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("scaletrain submit: sbatch refused the job: ")
    assert "invalid partition" in lines[0].lower(), lines[0]  # SLURM's words
