"""Where this process stands in a distributed job, read from its environment.

One place turns launcher variables into (rank, world size, local rank, master address and
port), so training code never reads SLURM_* or RANK itself. Sources, in order:

1. torchrun / DeepSpeed / our local launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
   MASTER_PORT.
2. SLURM tasks started by srun (submitit starts tasks through srun too): SLURM_PROCID,
   SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), SLURM_LOCALID, and the first host of
   SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST, SLURM_NODELIST) as master; the port is
   derived from the job id so every task of a job agrees on it without talking to each
   other. A batch script run without srun also sees SLURM_PROCID=0 and the job's
   SLURM_NTASKS, but it is one process, so it is treated as 3.
3. Otherwise: a single process, rank 0 of 1.

SLURM array tasks (preprocessing) read their place with ``array_task_from_environ``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

# Ports 20000-29999: above the registered-services range most clusters firewall, below the
# Linux ephemeral range (32768+), so a job-derived port rarely collides with a client socket.
logger = logging.getLogger(__name__)

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

    Zero padding of ranges is kept (``001-004`` gives ``002``, not ``2``), as SLURM does. A
    name may hold several bracket groups (``r[1-2]n[01-02]`` -> r1n01, r1n02, r2n01, r2n02).
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        part = part.strip()
        if not part:
            continue
        names = [""]
        for literal, ranges in _pattern_pieces(part, nodelist):
            names = [n + literal for n in names]
            if ranges is not None:
                suffixes = _expand_ranges(ranges, nodelist)
                names = [n + s for n in names for s in suffixes]
        hosts.extend(names)
    return hosts


def _pattern_pieces(part: str, whole: str) -> list[tuple[str, str | None]]:
    """``gpu[1-2]x`` -> [("gpu", "1-2"), ("x", None)]; unbalanced brackets are errors."""
    pieces: list[tuple[str, str | None]] = []
    rest = part
    while rest:
        open_at = rest.find("[")
        close_at = rest.find("]")
        if open_at < 0:
            if close_at >= 0:
                raise ValueError(f"SLURM node list {whole!r}: unbalanced ']' in {part!r}")
            pieces.append((rest, None))
            break
        close_at = rest.find("]", open_at)
        if close_at < 0 or "]" in rest[:open_at] or "[" in rest[open_at + 1 : close_at]:
            raise ValueError(f"SLURM node list {whole!r}: unbalanced brackets in {part!r}")
        pieces.append((rest[:open_at], rest[open_at + 1 : close_at]))
        rest = rest[close_at + 1 :]
    return pieces


def _expand_ranges(ranges: str, whole: str) -> list[str]:
    out: list[str] = []
    for item in ranges.split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise ValueError(f"SLURM node list {whole!r}: bad range {item!r}")
            width = len(lo)
            out.extend(f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
        elif item.isdigit():
            out.append(item)
        else:
            raise ValueError(f"SLURM node list {whole!r}: bad index {item!r}")
    return out


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
    if "SLURM_PROCID" in env and _in_srun_task(env):
        rank = _int(env, "SLURM_PROCID")
        # The step's task count, not the job's: `srun -n 2` inside a 4-task allocation
        # forms a world of 2.
        world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world = _int(env, world_var)
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        local_world = _slurm_tasks_on_this_node(env, world)
        nodelist = (
            env.get("SLURM_STEP_NODELIST")
            or env.get("SLURM_JOB_NODELIST")
            or env.get("SLURM_NODELIST")
            or ""
        )
        hosts = expand_nodelist(nodelist) if nodelist else []
        master = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:
            port = slurm_master_port(env.get("SLURM_JOB_ID", "0"))
        return _checked(DistEnv(rank, world, local_rank, local_world, master, port, "slurm"))
    if "SLURM_PROCID" in env and env.get("SLURM_NTASKS", "1") not in ("", "1"):
        # The batch script itself also sees SLURM_PROCID=0 and the job's SLURM_NTASKS, but
        # it is one process: treating it as rank 0 of N would wait forever for the others.
        logger.warning(
            "SLURM_NTASKS=%s but this process is the batch script, not an srun task: running "
            "as a single process (start one task per GPU with srun to use them all)",
            env.get("SLURM_NTASKS"),
        )
    return DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")


def _in_srun_task(env: Mapping[str, str]) -> bool:
    """srun (and submitit, which starts tasks through srun) marks each task with its step."""
    return any(name in env for name in ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS"))


def _slurm_tasks_on_this_node(env: Mapping[str, str], world: int) -> int:
    # SLURM_(STEP_)TASKS_PER_NODE looks like "4(x2),3": tasks per node, with repeat counts;
    # SLURM_NODEID indexes into its expansion. The step's value wins over the job's.
    name = next(
        (n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
         if env.get(n)),
        None,
    )
    if name is None:
        return world
    spec = env[name]
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ValueError(f"{name}={spec!r}: cannot parse {item!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    node = _int(env, "SLURM_NODEID") if env.get("SLURM_NODEID") else 0
    if not 0 <= node < len(counts):
        raise ValueError(f"SLURM_NODEID={node} outside the {len(counts)} nodes of {name}={spec!r}")
    return counts[node]


def array_task_from_environ(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(index, count) of this SLURM array task, index counted from 0.

    Read from SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT. Work is
    split by (index, count), so the array must be contiguous (``--array=0-7``, optionally
    with a ``%limit``); to redo part of the work, resubmit the whole array: tasks skip what
    is already done.
    """
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env:
        raise ValueError("SLURM_ARRAY_TASK_ID is not set: this is not a SLURM array task")
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    lo = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    if "SLURM_ARRAY_TASK_COUNT" in env:
        count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    elif "SLURM_ARRAY_TASK_MAX" in env:
        count = _int(env, "SLURM_ARRAY_TASK_MAX") - lo + 1
    else:
        raise ValueError("SLURM_ARRAY_TASK_COUNT (or _MAX) is not set")
    hi = _int(env, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in env else lo + count - 1
    if hi - lo + 1 != count:
        raise ValueError(
            f"SLURM array {lo}-{hi} has {count} tasks: indices must be contiguous "
            "(resubmit the whole array; finished work is skipped)"
        )
    if not lo <= task <= hi:
        raise ValueError(f"SLURM_ARRAY_TASK_ID={task} outside the array {lo}-{hi}")
    return task - lo, count


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


# --------------------------------------------------------------------------- exit statuses

# How a rank (and the launcher that started it) reports its end. 75 = EX_TEMPFAIL in
# sysexits.h, "try again later": preempted after a complete checkpoint, so requeue the job.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REQUEUE = 75


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (for a rendezvous this process starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def set_default_pg_timeout(seconds: float) -> timedelta:
    """Make ``seconds`` the timeout of every process group this process creates.

    DeepSpeed (and torch's own helpers) call ``dist.new_group(ranks)`` without a timeout,
    which falls back to torch's module default (30 min for gloo, 10 for NCCL), not to the
    world group's: a dead peer would then hang a ZeRO collective for half an hour. torch
    reads these two module globals whenever a group gets no explicit timeout.
    """
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def import_deepspeed():
    """Import DeepSpeed with the right accelerator: the CPU one when there is no CUDA device.

    DeepSpeed picks its accelerator when it is first imported; a CUDA build of torch on a
    machine without a GPU would otherwise select CUDA and fail later. So this is the one
    place that imports it, and every module that needs DeepSpeed calls this first.
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR is set (see above)
    import deepspeed.ops

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op that
        # only inference uses; the build takes minutes on a busy machine and serialises every
        # process on one lock file. Training only needs gloo, so mark the op unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed
