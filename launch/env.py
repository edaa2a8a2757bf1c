"""Where this process stands in a distributed job, read from its environment.

One place turns launcher variables into (rank, world size, local rank, master address and
port), so training code never reads SLURM_* or RANK itself. Sources, in order:

1. torchrun / DeepSpeed / our local launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
   MASTER_PORT.
2. SLURM (srun, submitit): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and the first host of
   SLURM_JOB_NODELIST (or SLURM_NODELIST) as master; the port is derived from the job id so
   every task of a job agrees on it without talking to each other.
3. Nothing set: a single process, rank 0 of 1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

# Ports 20000-29999: above the registered-services range most clusters firewall, below the
# Linux ephemeral range (32768+), so a job-derived port rarely collides with a client socket.
_PORT_BASE = 20000
_PORT_SPAN = 10000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: ``gpu[001-004,010],cpu7`` -> gpu001..gpu004, gpu010, cpu7.

    Zero padding of ranges is kept (``001-004`` gives ``002``, not ``2``), as SLURM does.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", part)
        if not match:
            if "[" in part or "]" in part:
                raise ValueError(f"SLURM node list {nodelist!r}: cannot parse {part!r}")
            if part:
                hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                    raise ValueError(f"SLURM node list {nodelist!r}: bad range {item!r}")
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            elif item.isdigit():
                hosts.append(f"{prefix}{item}{suffix}")
            else:
                raise ValueError(f"SLURM node list {nodelist!r}: bad index {item!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    if not value.strip().lstrip("-").isdigit():
        raise ValueError(f"environment variable {name}={value!r} is not an integer")
    return int(value)


def slurm_master_port(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id) or "0"
    return _PORT_BASE + int(digits) % _PORT_SPAN


def dist_env_from_environ(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read this process's place in the job from ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        master_port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
        return _checked(
            DistEnv(rank, world, local_rank, local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                    master_port, "torchrun")
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        local_world = _slurm_tasks_on_this_node(env, world)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        hosts = expand_nodelist(nodelist) if nodelist else []
        master = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:
            port = slurm_master_port(env.get("SLURM_JOB_ID", "0"))
        return _checked(DistEnv(rank, world, local_rank, local_world, master, port, "slurm"))
    return DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")


def _slurm_tasks_on_this_node(env: Mapping[str, str], world: int) -> int:
    # SLURM_TASKS_PER_NODE looks like "4(x2),3": tasks per node, with repeat counts.
    # SLURM_NODEID indexes into its expansion.
    spec = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
    if not spec:
        return world
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r}: cannot parse {item!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return counts[min(node, len(counts) - 1)]


def _checked(d: DistEnv) -> DistEnv:
    if d.world_size < 1:
        raise ValueError(f"world size must be >= 1, got {d.world_size} (from {d.source})")
    if not 0 <= d.rank < d.world_size:
        raise ValueError(f"rank {d.rank} outside world of {d.world_size} (from {d.source})")
    if not 0 <= d.local_rank < max(d.local_world_size, 1):
        raise ValueError(
            f"local rank {d.local_rank} outside {d.local_world_size} local tasks (from {d.source})"
        )
    return d
