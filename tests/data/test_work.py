"""Input expansion, output names, and rank/world from SLURM arrays, torchrun or nothing."""

from __future__ import annotations

import pytest

from scaletrain.data.preprocess.work import (
    assign,
    expand_inputs,
    output_stem,
    resolve_rank_world,
    shard_table,
)


def test_expand_braces_lists_globs_and_pipes(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    assert expand_inputs(f"{tmp_path}/{{00000..00002}}.tar") == [
        str(tmp_path / f"{i:05d}.tar") for i in range(3)
    ]
    assert expand_inputs(f"{tmp_path}/*.tar") == expand_inputs(f"{tmp_path}/{{00000..00002}}.tar")
    assert expand_inputs(["b/{1..2}.tar::a/0.tar"]) == ["a/0.tar", "b/1.tar", "b/2.tar"]
    assert expand_inputs("pipe:cat x/{00..01}.tar") == ["pipe:cat x/00.tar", "pipe:cat x/01.tar"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_inputs(f"{tmp_path}/*.nothing")


def test_output_stems():
    assert output_stem("/data/raw/00042.tar") == "00042"
    assert output_stem("pipe:aws s3 cp s3://bucket/shards/00042.tar -") == "00042"
    assert output_stem("https://host/a/b/00007.tar?token=x") == "00007"
    with pytest.raises(ValueError, match="no word of it ends in .tar"):
        output_stem("pipe:cat something")
    with pytest.raises(ValueError, match="both write 00001.tar"):
        shard_table(["a/00001.tar", "b/00001.tar"])


def test_rank_world_from_slurm_array():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_rank_world(env)[:2] == (2, 4)
    stepped = {
        "SLURM_ARRAY_TASK_ID": "20",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_MAX": "30",
        "SLURM_ARRAY_TASK_STEP": "10",
    }
    assert resolve_rank_world(stepped)[:2] == (2, 4)
    # An array task running two srun tasks nests them.
    nested = {**env, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    assert resolve_rank_world(nested)[:2] == (5, 8)
    # The batch script of an array task is not an srun task: one process per array task.
    batch_script = {**env, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert resolve_rank_world(batch_script)[:2] == (2, 4)
    with pytest.raises(ValueError, match="outside"):
        resolve_rank_world({**env, "SLURM_ARRAY_TASK_ID": "9"})


def test_rank_world_from_torchrun_or_nothing():
    assert resolve_rank_world({"RANK": "3", "WORLD_SIZE": "4"})[:2] == (3, 4)
    assert resolve_rank_world({}) == (0, 1, "single")


def test_assignment_covers_every_shard_once():
    shards = list(range(10))
    parts = [assign(shards, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == shards
    assert parts[0] == [0, 3, 6, 9]
    with pytest.raises(ValueError):
        assign(shards, 3, 3)


def test_output_apart_from_inputs_local_and_object_storage(tmp_path):
    from scaletrain.core.config_base import ConfigError
    from scaletrain.data.preprocess.work import check_output_apart

    raw = [f"{tmp_path}/raw/00000.tar", f"{tmp_path}/raw/00001.tar"]
    for bad in (tmp_path / "raw", tmp_path / "raw" / "x", tmp_path, f"{tmp_path}/raw/"):
        with pytest.raises(ConfigError, match="apart from the inputs"):
            check_output_apart(str(bad), raw)
    check_output_apart(str(tmp_path / "latents"), raw)  # a sibling is fine
    check_output_apart(str(tmp_path / "raw2"), raw)  # a name prefix is not a parent
    s3 = ["s3://bucket/raw/00000.tar"]
    for bad in ("s3://bucket/raw", "s3://bucket/raw/latents", "s3://bucket", "s3://bucket/"):
        with pytest.raises(ConfigError, match="apart from the inputs"):
            check_output_apart(bad, s3)
    check_output_apart("s3://bucket/latents", s3)
    check_output_apart("s3://other/raw", s3)
    check_output_apart(str(tmp_path / "raw"), s3)  # a local folder is not the bucket
    check_output_apart("s3://bucket/raw", ["pipe:curl -s http://h/raw/00000.tar"])
