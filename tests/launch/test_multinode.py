"""The 2-node test cluster: each node its own namespace and address, names resolvable, the
master address taken from the node list, and gloo all-reduce across the nodes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.multinode]

# One task: where am I, who is master, and a gloo all-reduce over every task of the step.
TASK = r"""
import json, os, socket
import torch, torch.distributed as dist
from scaletrain.core.dist_env import dist_env_from_environ
d = dist_env_from_environ()
os.environ.update(d.as_torch_env())
dist.init_process_group("gloo", rank=d.rank, world_size=d.world_size)
t = torch.tensor([float(d.rank + 1)])
dist.all_reduce(t)
node = os.environ["SLURMD_NODENAME"]
print(json.dumps({"rank": d.rank, "world": d.world_size, "node": node,
                  "addr": socket.gethostbyname(node), "master": d.master_addr,
                  "master_ip": socket.gethostbyname(d.master_addr), "sum": t.item(),
                  "local_world": d.local_world_size}), flush=True)
dist.destroy_process_group()
"""


def _run(cluster, *layout: str) -> list[dict]:
    ifname = cluster.socket_ifname
    out = cluster.run("srun", *layout, f"--export=ALL,GLOO_SOCKET_IFNAME={ifname}",
                      sys.executable, "-c", TASK, timeout=240)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


@pytest.mark.parametrize("per_node", [1, 2])
def test_gloo_across_two_namespaced_nodes(slurm_multinode_cluster, per_node):
    cluster = slurm_multinode_cluster
    rows = _run(cluster, "-N2", f"--ntasks-per-node={per_node}")
    world = 2 * per_node
    assert [r["rank"] for r in rows] == list(range(world))
    assert {r["node"] for r in rows} == set(cluster.node_names)
    assert all(r["local_world"] == per_node for r in rows)
    # The first node of the step's node list is master, by name, as on a real cluster.
    assert {r["master"] for r in rows} == {cluster.node_names[0]}
    addrs = dict(zip(cluster.node_names, cluster.network.addresses, strict=True))
    assert all(r["addr"] == addrs[r["node"]] for r in rows)
    assert {r["master_ip"] for r in rows} == {addrs[cluster.node_names[0]]}
    assert all(r["sum"] == world * (world + 1) / 2 for r in rows)


def test_node_names_resolve_only_while_the_cluster_runs(slurm_multinode_cluster):
    """The fixture's /etc/hosts lines are there now (and removed at stop, see stop())."""
    for name, addr in zip(slurm_multinode_cluster.node_names,
                          slurm_multinode_cluster.network.addresses, strict=True):
        assert socket.gethostbyname(name) == addr


def test_network_teardown_leaves_nothing_behind(tmp_path):
    """create() then remove(): /etc/hosts byte-identical, namespaces and links gone."""
    import os

    from tests.support.slurm_cluster import ClusterUnavailable, NodeNetwork

    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    hosts_before = NodeNetwork.HOSTS.read_bytes()
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    net = NodeNetwork(2)
    try:
        net.create()
    except ClusterUnavailable as exc:
        net.remove()
        pytest.skip(str(exc))
    assert all(os.path.exists(f"/run/netns/{n}") for n in net.names)
    assert socket.gethostbyname(net.names[1]) == net.addresses[1]
    net.remove()
    assert NodeNetwork.HOSTS.read_bytes() == hosts_before
    links_after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert links_after.count("\n") == links_before.count("\n")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in netns for n in net.names)


# --------------------------------------------------------------------------- training jobs
# One task per node, the tiny run of test_slurm_jobs with more steps: 30 steps with a
# checkpoint every 2 leave a few seconds between the first checkpoint and the end for the
# preemption and the node failure to land mid-run.

MN_STEPS = 30
ONE_PER_NODE = ("--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--time", "60")


@pytest.fixture(scope="module")
def mn_config(tmp_path_factory):
    from .test_slurm_jobs import train_yaml

    path = tmp_path_factory.mktemp("multinode_config") / "tiny.yaml"
    path.write_text(train_yaml(MN_STEPS))
    return path


@pytest.fixture(scope="module")
def one_node_reference(mn_config, tmp_path_factory):
    """The same 2-rank run on this machine (`scaletrain train --nproc 2`), uninterrupted:
    what every 2-node run below must reproduce bit for bit."""
    from .test_slurm_jobs import _env

    ref_dir = tmp_path_factory.mktemp("one_node") / "run"
    # No short timeout: this trains.
    ref = subprocess.run([sys.executable, "-m", "scaletrain.cli", "train", str(mn_config),
                          "--run-dir", str(ref_dir), "--nproc", "2"],
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-4000:]
    return ref_dir


def _submit(cluster, run_dir, config, *extra: str) -> str:
    from .test_slurm_jobs import submit_training

    return submit_training(run_dir, config, f"slurm.socket_ifname={cluster.socket_ifname}",
                           *extra, tasks=ONE_PER_NODE)


def test_submit_on_two_nodes_matches_the_same_world_size_on_one_node(
        slurm_multinode_cluster, mn_config, one_node_reference, tmp_path):
    """(a) `scaletrain submit --nodes 2` (one task per node) trains over gloo across the two
    namespaces; each rank logs its node, its address and the master's; the final weights
    and EMA equal those of the same 2-rank run on one machine bit for bit."""
    from .test_slurm_jobs import assert_same_final_weights, job_logs, wait_completed

    cluster = slurm_multinode_cluster
    run_dir = tmp_path / "run"
    job_id = _submit(cluster, run_dir, mn_config)
    wait_completed(job_id, run_dir)

    logs = job_logs(run_dir, chars=10**7)  # the address lines come first in long logs
    first, second = cluster.node_names
    addr = dict(zip(cluster.node_names, cluster.network.addresses, strict=True))
    master = f"master {first} ({addr[first]})"
    assert f"rank 0/2 (local 0) on {first} ({addr[first]}), {master}" in logs, logs
    assert f"rank 1/2 (local 0) on {second} ({addr[second]}), {master}" in logs, logs
    assert find_latest_name(run_dir) == f"step_{MN_STEPS:09d}"
    assert_same_final_weights(run_dir, one_node_reference)


def find_latest_name(run_dir) -> str | None:
    from scaletrain.core.run_dir import find_latest

    latest = find_latest(run_dir)
    return None if latest is None else latest.name


def test_preempted_two_node_job_requeues_resumes_and_matches(
        slurm_multinode_cluster, mn_config, one_node_reference, tmp_path):
    """(b) SIGUSR1 to a 2-node job mid-run: both nodes stop at the same step and save one
    checkpoint, rank 0 requeues the job, it resumes (on whichever nodes SLURM gives it);
    the final weights and EMA equal the uninterrupted run's bit for bit."""
    from scaletrain.launch.records import read_job_records
    from scaletrain.launch.slurm_state import accounting_states

    from .test_slurm_jobs import (
        _env,
        assert_same_final_weights,
        job_logs,
        wait_completed,
        wait_for_checkpoint,
    )

    run_dir = tmp_path / "run"
    job_id = _submit(slurm_multinode_cluster, run_dir, mn_config)
    wait_for_checkpoint(job_id, run_dir)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, env=_env())
    wait_completed(job_id, run_dir)

    events = [(r["event"], r.get("restart")) for r in read_job_records(run_dir)]
    assert events == [("submitted", None), ("started", 0), ("requeued", 0), ("started", 1),
                      ("completed", 1)], f"{events}\n{job_logs(run_dir)}"
    assert accounting_states(job_id, all_runs=True) == ["REQUEUED", "COMPLETED"]
    assert "resumed from" in job_logs(run_dir, chars=10**7)
    assert_same_final_weights(run_dir, one_node_reference)


def _kill_rank_1_and_wait_for_the_requeue(job_id: str, run_dir, how: str = "SIGKILL"):
    """Send ``how`` to rank 1 (on the second node) once the job has its first checkpoint;
    return the newest complete checkpoint once SLURM has the job pending again: what it must
    resume from."""
    import os
    import re
    import signal
    import time

    from scaletrain.core.run_dir import find_latest, heartbeat_dir
    from scaletrain.launch.slurm_state import live_state

    from .test_slurm_jobs import JOB_TIMEOUT, job_logs, wait_for_checkpoint

    wait_for_checkpoint(job_id, run_dir)
    # The heartbeat file says which process is rank 1.
    beat = heartbeat_dir(run_dir) / f"{job_id}-0" / "rank_1"
    pid = int(re.match(r"pid (\d+)", beat.read_text()).group(1))
    os.kill(pid, signal.Signals[how])
    deadline = time.monotonic() + JOB_TIMEOUT
    # A requeued job waits pending a few seconds (the test cluster's cred_expire) first.
    while live_state(job_id) not in ("PENDING", "REQUEUED"):
        assert time.monotonic() < deadline, f"not requeued\n{job_logs(run_dir)}"
        time.sleep(0.1)
    last_complete = find_latest(run_dir)
    assert last_complete is not None
    return last_complete


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_rank_killed_on_one_node_requeues_the_job_and_it_resumes(
        slurm_multinode_cluster, mn_config, one_node_reference, tmp_path, how):
    """(c) SIGKILL of the training process on the second node mid-run (what the OOM killer
    or a lost node does to a rank): the rank left on the first node does not wait for the
    time limit; its collective fails, it finds the dead rank's heartbeat left behind and
    requeues the job (exit 75); the job resumes from the last complete checkpoint, and the
    final weights and EMA equal the uninterrupted run's bit for bit. SIGSTOP (a frozen
    process): the same once rank 1 has been silent for train.dist_timeout_s, whether rank
    0's heartbeat watch or its collective's timeout notices first."""
    import re

    from scaletrain.launch.records import read_job_records
    from scaletrain.launch.slurm_state import accounting_states

    from .test_slurm_jobs import assert_same_final_weights, job_logs, wait_completed

    run_dir = tmp_path / "run"
    # A short process-group timeout bounds the wait when a death is not seen at once.
    job_id = _submit(slurm_multinode_cluster, run_dir, mn_config, "train.dist_timeout_s=30")
    last_complete = _kill_rank_1_and_wait_for_the_requeue(job_id, run_dir, how)
    wait_completed(job_id, run_dir)

    records = read_job_records(run_dir)
    events = [(r["event"], r.get("restart")) for r in records]
    assert events == [("submitted", None), ("started", 0), ("requeued", 0), ("started", 1),
                      ("completed", 1)], f"{events}\n{job_logs(run_dir)}"
    requeued = next(r for r in records if r["event"] == "requeued")
    assert re.match(r"rank 1 (died or )?stopped \(no heartbeat", requeued["cause"]), requeued
    assert accounting_states(job_id, all_runs=True) == ["REQUEUED", "COMPLETED"]
    logs = job_logs(run_dir, chars=10**7)
    assert re.search(r"rank 0: .*rank 1 died or stopped .*exit 75|rank 1 stopped making "
                     r"progress .*exit 75", logs), logs
    # Resumed from exactly that checkpoint: nothing after it counted as done.
    step = int(last_complete.name.removeprefix("step_"))
    assert f"resumed from {last_complete} at step {step} " in logs, logs
    assert_same_final_weights(run_dir, one_node_reference)


def test_a_rank_killed_under_the_sbatch_template_requeues_the_job(
        slurm_multinode_cluster, mn_config, one_node_reference, tmp_path):
    """(c) the same with slurm/train.sbatch (srun + `scaletrain train`) on two nodes: srun
    reports the killed task, the script requeues the job, and it resumes from the last
    complete checkpoint to the uninterrupted run's weights and EMA."""
    from scaletrain.launch.slurm_state import accounting_states, wait_for_terminal

    from .test_slurm_jobs import JOB_TIMEOUT, REPO, _env, assert_same_final_weights

    run_dir = tmp_path / "run"
    ifname = slurm_multinode_cluster.socket_ifname
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
         "--cpus-per-task=1", "--time=60", f"--output={tmp_path}/job-%j.out",
         f"--export=ALL,GLOO_SOCKET_IFNAME={ifname}", str(REPO / "slurm" / "train.sbatch"),
         str(mn_config), str(run_dir), "train.dist_timeout_s=30"],
        env=_env(), capture_output=True, text=True, check=True, cwd=tmp_path,
    )
    job_id = out.stdout.strip().split(";")[0]
    last_complete = _kill_rank_1_and_wait_for_the_requeue(job_id, run_dir)
    state = wait_for_terminal(job_id, timeout=JOB_TIMEOUT)
    text = (tmp_path / f"job-{job_id}.out").read_text()
    assert state == "COMPLETED", text
    assert accounting_states(job_id, all_runs=True) == ["REQUEUED", "COMPLETED"]
    assert f"requeuing job {job_id}" in text, text
    step = int(last_complete.name.removeprefix("step_"))
    assert f"resumed from {last_complete} at step {step} " in text, text
    assert_same_final_weights(run_dir, one_node_reference)
