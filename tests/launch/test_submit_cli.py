"""`scaletrain submit` without a cluster: flags, validation, --dry-run, records."""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import pytest
import yaml

from scaletrain import cli
from scaletrain.cli.submit import parse_slurm_time
from scaletrain.core.config_base import ConfigError
from scaletrain.launch.config import SlurmConfig
from scaletrain.launch.records import append_job_record, read_job_records, snapshot_code
from scaletrain.launch.submit import (
    finalize_parameters,
    preprocess_parameters,
    training_parameters,
    wandb_info,
)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("seed: 3\nslurm: {partition: from_yaml, account: proj, time_min: 30}\n")
    return path


def _dry_run(capsys, *argv):
    code = cli.main(["submit", *map(str, argv), "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, out.err
    head, _, config_text = out.out.partition("# resolved config\n")
    params_text = head.split("# SLURM parameters\n")[1].split("# batch script")[0]
    return yaml.safe_load(params_text)["slurm_parameters"], yaml.safe_load(config_text), out.out


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("1:30", 2), ("01:30:00", 90), ("2-00:00:00", 2880), ("1-12", 2160),
     ("0-00:00:30", 1), ("1-00:30", 1470)],
)
def test_parse_slurm_time(text, minutes):
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "-5", "0", "1:2:3:4", "00:00:00"])
def test_parse_slurm_time_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="time"):
        parse_slurm_time(text)


def test_dry_run_training_prints_parameters_and_config_and_submits_nothing(
        capsys, config, tmp_path):
    run_dir = tmp_path / "run"
    params, cfg, text = _dry_run(
        capsys, config, "--run-dir", run_dir, "--nodes", "4", "--gpus-per-node", "8",
        "--time", "2-00:00:00", "--mem", "0", "--exclusive", "--qos", "high",
        "--constraint", "h100", "--cpus-per-task", "12", "train.lr=3e-4",
    )
    assert params["nodes"] == 4
    assert params["ntasks_per_node"] == 8  # one task per GPU
    assert params["gpus_per_node"] == 8
    assert params["time"] == 2880
    assert params["mem"] == "0"  # a string for sbatch, not the number 0
    assert params["exclusive"] is True
    assert params["partition"] == "from_yaml" and params["account"] == "proj"
    assert (params["qos"], params["constraint"], params["cpus_per_task"]) == ("high", "h100", 12)
    assert params["signal"] == "USR1@300"  # the trainer's preemption signal
    assert params["requeue"] is True
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in params["setup"]
    # The sbatch script preview carries the same options.
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --mem=0",
                 "#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --time=2880"):
        assert f"#   {line}\n" in text
    # The resolved config shows flags and overrides applied.
    assert cfg["seed"] == 3 and cfg["train"]["lr"] == pytest.approx(3e-4)
    assert cfg["slurm"]["nodes"] == 4 and cfg["slurm"]["time_min"] == 2880
    assert not run_dir.exists()


def test_flags_win_over_yaml_and_overrides(capsys, config, tmp_path):
    params, cfg, _ = _dry_run(capsys, config, "--run-dir", tmp_path / "r", "--partition", "gpu",
                              "slurm.partition=cpu", "slurm.nodes=3")
    assert params["partition"] == cfg["slurm"]["partition"] == "gpu"
    assert params["nodes"] == 3  # an override without a flag still applies


def test_cpu_only_job_uses_tasks_per_node(capsys, config, tmp_path):
    params, cfg, _ = _dry_run(capsys, config, "--run-dir", tmp_path / "r", "--gpus-per-node",
                              "0", "--tasks-per-node", "2")
    assert params["ntasks_per_node"] == 2
    assert "gpus_per_node" not in params
    assert SlurmConfig(gpus_per_node=0, tasks_per_node=2, nodes=3).world_size == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus-per-node", "8", "--tasks-per-node", "4"], "slurm.tasks_per_node: must equal"),
        (["--mem", "lots"], "slurm.mem: must look like"),
        (["--nodes", "0"], "slurm.nodes: must be > 0"),
        (["--time", "10", "--signal-delay", "600"], "slurm.signal_delay_s"),
    ],
)
def test_bad_resources_are_config_errors_naming_the_key(capsys, config, tmp_path, argv, message):
    code = cli.main(["submit", str(config), "--run-dir", str(tmp_path / "r"), *argv, "--dry-run"])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--run-dir is required"),
        (["--run-dir", "r", "--array-size", "4"], "--array-size is for --preprocess only"),
        (["--preprocess", "--output", "o"], "--preprocess needs --input, --array-size"),
        (["--preprocess", "--input", "x", "--output", "o", "--array-size", "0"],
         "--array-size must be >= 1"),
    ],
)
def test_usage_errors(capsys, config, argv, message):
    assert cli.main(["submit", str(config), *argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_time_flag_rejects_garbage(capsys, config):
    with pytest.raises(SystemExit):
        cli.main(["submit", str(config), "--run-dir", "r", "--time", "soon"])
    assert "expected minutes" in capsys.readouterr().err


def test_preprocess_and_finalize_parameters():
    s = SlurmConfig(gpus_per_node=8, nodes=4, preprocess_gpus=1, array_parallelism=0,
                    cpus_per_task=6, time_min=120, job_name="enc")
    p = preprocess_parameters(s, array_size=16)
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"]) == (1, 1, 1)
    assert p["array_parallelism"] == 16 and p["cpus_per_task"] == 6
    f = finalize_parameters(s, "777")
    assert f["dependency"] == "afterok:777"
    assert f["additional_parameters"]["kill-on-invalid-dep"] == "yes"
    assert "gpus_per_node" not in f and f["time"] == 60 and f["job_name"] == "enc-index"
    t = training_parameters(SlurmConfig(gpus_per_node=0, tasks_per_node=2))
    assert t["ntasks_per_node"] == 2 and "gpus_per_node" not in t


def test_wandb_info_names_the_run_like_the_trainer(tmp_path):
    from scaletrain.config import load_config

    cfg = load_config(None, ["logging.wandb_project=proj"])
    info = wandb_info(cfg, tmp_path / "exp7")
    assert info["name"] == "exp7"  # the run directory's name unless logging.run_name is set
    assert info["dir"] == str(tmp_path / "exp7" / "wandb")
    assert info["project"] == "proj"


def test_records_append_and_read(tmp_path):
    append_job_record(tmp_path, "submitted", job_id="12")
    append_job_record(tmp_path, "started", job_id="12", restart=0)
    records = read_job_records(tmp_path)
    assert [(r["event"], r["job_id"]) for r in records] == [("submitted", "12"), ("started", "12")]
    assert read_job_records(tmp_path / "nothing") == []
    (tmp_path / "slurm" / "jobs.jsonl").open("a").write("{not json\n")
    with pytest.raises(ValueError, match="jobs.jsonl:3: not a JSON line"):
        read_job_records(tmp_path)


def test_code_snapshot_holds_the_sources_and_git_revision(tmp_path):
    info = snapshot_code(tmp_path)
    with tarfile.open(tmp_path / "code.tar.gz") as tar:
        names = set(tar.getnames())
    assert "scaletrain/launch/submit.py" in names and "scaletrain/cli/__init__.py" in names
    assert "configs/train/demo.yaml" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    saved = json.loads((tmp_path / "code.json").read_text())
    assert saved == info and info["files"] == len(names)
    if info["git_rev"] is not None:  # a git checkout (always in development and CI)
        assert len(info["git_rev"]) == 40
        assert (tmp_path / "code.diff").exists() == info["git_dirty"]


def test_slurm_config_validation():
    with pytest.raises(ConfigError, match="tasks_per_node"):
        SlurmConfig(gpus_per_node=4, tasks_per_node=2)
    assert SlurmConfig(gpus_per_node=4, tasks_per_node=4).tasks_per_node_resolved == 4
    assert SlurmConfig(gpus_per_node=0).tasks_per_node_resolved == 1
    assert SlurmConfig(mem="500000M").mem == "500000M"


def test_dry_run_preprocessing_array(capsys, tmp_path):
    from scaletrain.data.synthetic import write_synthetic_shards

    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=3, samples_per_shard=1, size=16)
    params, cfg, text = _dry_run(
        capsys, Path(__file__).resolve().parents[2] / "configs" / "data" / "demo.yaml",
        "--preprocess", "--input", pattern, "--output",
        tmp_path / "out", "--array-size", "8", "--gpus-per-node", "1",
    )
    assert "3 input shard(s)" in text and "array of 3 task(s)" in text  # capped at one a shard
    assert params["array_parallelism"] == 3
    assert (params["nodes"], params["ntasks_per_node"], params["gpus_per_node"]) == (1, 1, 1)
    assert cfg["slurm"]["preprocess_gpus"] == 1
    assert cfg["preprocess"]["resolution"] == 64  # the demo preset's preprocessing section
    assert not (tmp_path / "out").exists()
