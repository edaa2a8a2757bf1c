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


def test_submit_on_two_nodes_matches_the_same_world_size_on_one_node(
        slurm_multinode_cluster, tmp_path):
    """(a) `scaletrain submit --nodes 2` (one task per node) trains over gloo across the two
    namespaces; each rank logs its node, its address and the master's; the final weights
    and EMA equal those of the same 2-rank run on one machine bit for bit."""
    import re

    import torch

    from .test_slurm_jobs import STEPS, TRAIN_YAML, _env, final_weights, job_logs, wait_completed

    def scaletrain(*argv):  # no short timeout: the local reference run trains too
        return subprocess.run([sys.executable, "-m", "scaletrain.cli", *map(str, argv)],
                              env=_env(), capture_output=True, text=True, timeout=900)

    cluster = slurm_multinode_cluster
    config = tmp_path / "tiny.yaml"
    config.write_text(TRAIN_YAML)
    run_dir = tmp_path / "run"
    proc = scaletrain("submit", config, "--run-dir", run_dir, "--nodes", "2",
                      "--gpus-per-node", "0", "--tasks-per-node", "1", "--time", "60",
                      f"slurm.socket_ifname={cluster.socket_ifname}")
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    wait_completed(job_id, run_dir)

    logs = job_logs(run_dir)
    first, second = cluster.node_names
    addr = dict(zip(cluster.node_names, cluster.network.addresses, strict=True))
    master = f"master {first} ({addr[first]})"
    assert f"rank 0/2 (local 0) on {first} ({addr[first]}), {master}" in logs, logs
    assert f"rank 1/2 (local 0) on {second} ({addr[second]}), {master}" in logs, logs

    ref_dir = tmp_path / "one_node"
    ref = scaletrain("train", config, "--run-dir", ref_dir, "--nproc", "2")
    assert ref.returncode == 0, ref.stderr[-4000:]
    ref_latest, ref_model, ref_ema = final_weights(ref_dir)
    latest, model, ema = final_weights(run_dir)
    assert latest.name == ref_latest.name == f"step_{STEPS:09d}"
    for name in ref_model:
        assert torch.equal(model[name], ref_model[name]), f"weights differ: {name}"
    for name in ref_ema:
        assert torch.equal(ema[name], ref_ema[name]), f"EMA differs: {name}"
