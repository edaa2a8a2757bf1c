"""The 2-node test cluster: each node its own namespace and address, names resolvable, the
master address taken from the node list, and gloo all-reduce across the nodes."""

from __future__ import annotations

import json
import socket
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
    import subprocess

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
