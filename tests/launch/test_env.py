"""scaletrain.core.dist_env: environment -> (rank, world, local rank, master) over every launcher."""

from __future__ import annotations

import logging

import pytest

from scaletrain.core.dist_env import (
    array_task_from_environ,
    dist_env_from_environ,
    expand_nodelist,
    slurm_master_port,
)

# What srun exports to task 5 of `srun -N 2 --ntasks-per-node 4` inside a job on gpu[007-008]
# (variable names and formats as SLURM 22.05 writes them).
SRUN_TASK_5 = {
    "SLURM_JOB_ID": "424242",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_ID": "0",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
}


# --------------------------------------------------------------------------- node lists


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("a,b,c", ["a", "b", "c"]),
        ("gpu[001-004,010]", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010"]),
        ("gpu[001-004,010],cpu7", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "cpu7"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),  # no padding: widths grow
        ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),  # padding kept
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),  # suffix after the brackets
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),  # two groups: product
        ("a[1,3],b[2-3]", ["a1", "a3", "b2", "b3"]),
        ("x[5]", ["x5"]),
        ("", []),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "bad, why",
    [
        ("gpu[001-004", "unbalanced"),
        ("gpu001]", "unbalanced"),
        ("gpu[4-1]", "bad range"),
        ("gpu[a-b]", "bad range"),
        ("gpu[1,x]", "bad index"),
        ("gpu[[1]]", "unbalanced"),
    ],
)
def test_expand_nodelist_rejects_malformed(bad, why):
    with pytest.raises(ValueError, match=why) as err:
        expand_nodelist(bad)
    assert repr(bad) in str(err.value)  # the message names the whole list


# --------------------------------------------------------------------------- SLURM


def test_slurm_multi_node_task():
    d = dist_env_from_environ(SRUN_TASK_5)
    assert d.source == "slurm"
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (5, 8, 1, 4)
    assert d.master_addr == "gpu007"  # first host of the node list
    assert d.master_port == slurm_master_port("424242")
    assert not d.is_main


def test_slurm_master_from_compressed_multi_range_list():
    env = dict(SRUN_TASK_5, SLURM_JOB_NODELIST="gpu[001-004,010]")
    del env["SLURM_STEP_NODELIST"]
    env["SLURM_TASKS_PER_NODE"] = env["SLURM_STEP_TASKS_PER_NODE"] = "4(x5)"
    env["SLURM_NTASKS"] = env["SLURM_STEP_NUM_TASKS"] = "20"
    d = dist_env_from_environ(env)
    assert d.master_addr == "gpu001"
    assert d.world_size == 20


def test_slurm_step_values_win_over_job_values():
    # `srun -n 2` inside a 4-task allocation on two nodes, running on the second node only.
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_ID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_STEP_NODELIST": "n2",
        "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "2",
    }
    d = dist_env_from_environ(env)
    assert (d.rank, d.world_size, d.local_world_size, d.master_addr) == (1, 2, 2, "n2")


def test_slurm_uneven_tasks_per_node():
    env = dict(SRUN_TASK_5, SLURM_STEP_TASKS_PER_NODE="3,5", SLURM_NODEID="1", SLURM_LOCALID="4")
    assert dist_env_from_environ(env).local_world_size == 5
    env["SLURM_NODEID"] = "0"
    env["SLURM_LOCALID"] = "2"
    env["SLURM_PROCID"] = "2"
    assert dist_env_from_environ(env).local_world_size == 3


def test_slurm_explicit_master_wins():
    env = dict(SRUN_TASK_5, MASTER_ADDR="10.0.0.9", MASTER_PORT="31000")
    d = dist_env_from_environ(env)
    assert (d.master_addr, d.master_port) == ("10.0.0.9", 31000)


def test_slurm_port_is_shared_by_a_job_and_differs_between_jobs():
    ports = {slurm_master_port(str(j)) for j in range(1000, 1100)}
    assert len(ports) == 100  # consecutive job ids never share a port
    assert all(20000 <= p < 30000 for p in ports)
    assert slurm_master_port("1234") == slurm_master_port("1234")
    assert slurm_master_port("1234_7") != slurm_master_port("1234_8")  # array tasks


def test_slurm_as_torch_env_round_trips():
    d = dist_env_from_environ(SRUN_TASK_5)
    again = dist_env_from_environ(d.as_torch_env())
    assert again.source == "torchrun"
    assert (again.rank, again.world_size, again.local_rank, again.local_world_size) == (5, 8, 1, 4)
    assert (again.master_addr, again.master_port) == (d.master_addr, d.master_port)


def test_batch_script_without_srun_is_a_single_process(caplog):
    # What an sbatch script with --ntasks=2 sees before any srun (measured on SLURM 22.05).
    env = {
        "SLURM_JOB_ID": "2",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "vm",
        "SLURM_TASKS_PER_NODE": "2",
    }
    with caplog.at_level(logging.WARNING, logger="scaletrain.core.dist_env"):
        d = dist_env_from_environ(env)
    assert (d.source, d.rank, d.world_size) == ("single", 0, 1)
    assert "srun" in caplog.text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"SLURM_PROCID": "8"}, "rank 8 outside world of 8"),
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
        ({"SLURM_STEP_NUM_TASKS": "0", "SLURM_PROCID": "0"}, "world size must be >= 1"),
        ({"SLURM_LOCALID": "4"}, "local rank 4 outside 4 local tasks"),
        ({"SLURM_STEP_TASKS_PER_NODE": "4(y2)"}, "cannot parse"),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 outside the 2 nodes"),
        ({"SLURM_STEP_NODELIST": "gpu[1-"}, "unbalanced"),
    ],
)
def test_slurm_errors_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        dist_env_from_environ(dict(SRUN_TASK_5, **change))


# --------------------------------------------------------------------------- torchrun, single


def test_torchrun():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "host-a",
        "MASTER_PORT": "29600",
    }
    d = dist_env_from_environ(env)
    assert d == dist_env_from_environ(dict(env))  # pure function of the mapping
    assert (d.source, d.rank, d.world_size, d.local_rank, d.local_world_size) == (
        "torchrun", 3, 4, 1, 2,
    )
    assert (d.master_addr, d.master_port) == ("host-a", 29600)


def test_torchrun_wins_over_slurm():
    # torchrun (or our local launcher) started inside a SLURM allocation: its variables
    # describe the processes actually running.
    env = dict(SRUN_TASK_5, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1")
    d = dist_env_from_environ(env)
    assert (d.source, d.rank, d.world_size) == ("torchrun", 1, 2)


def test_torchrun_defaults_for_missing_optional_variables():
    d = dist_env_from_environ({"RANK": "0", "WORLD_SIZE": "1"})
    assert (d.local_rank, d.local_world_size, d.master_addr, d.master_port) == (
        0, 1, "127.0.0.1", 29500,
    )


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 outside world of 2"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "rank -1 outside"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": ""}, "MASTER_PORT='' is not an integer"),
    ],
)
def test_torchrun_errors(env, message):
    with pytest.raises(ValueError, match=message):
        dist_env_from_environ(env)


def test_single_process():
    d = dist_env_from_environ({"PATH": "/usr/bin"})
    assert (d.source, d.rank, d.world_size, d.local_rank, d.local_world_size) == (
        "single", 0, 1, 0, 1,
    )
    assert d.is_main


def test_reads_os_environ_by_default(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert dist_env_from_environ().rank == 1


# --------------------------------------------------------------------------- job arrays


def test_array_task_counts_from_the_array_minimum():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
           "SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert array_task_from_environ(env) == (1, 4)
    env = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert array_task_from_environ(env) == (0, 3)


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "not a SLURM array task"),
        ({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT"),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "4",
          "SLURM_ARRAY_TASK_COUNT": "3"}, "contiguous"),
        ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4"}, "outside the array 0-3"),
    ],
)
def test_array_task_errors(env, message):
    with pytest.raises(ValueError, match=message):
        array_task_from_environ(env)
