"""Preprocessing with N local processes, each a rank of its own (``--workers N``).

Workers are spawned (never forked: a parent may hold CUDA or threads) and share the cores
out. Each reports its summary on a queue; a worker killed from outside is noticed by its exit
status, since it never reports.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import sys

import torch

from scaletrain.core.config_base import ConfigError
from scaletrain.core.log import setup_logging
from scaletrain.data.encoders.common import quiet_hub_libraries
from scaletrain.data.preprocess.pipeline import preprocess_shards


def run_rank(cfg, inputs, output, rank, world, verify, finalize=True, storage_cfg=None):
    quiet_hub_libraries()
    return preprocess_shards(
        cfg, inputs, output, rank=rank, world=world, finalize=finalize, verify=verify,
        storage_cfg=storage_cfg,
    )


def _child(queue, cfg, inputs, output, local, workers, base_rank, base_world, verify,
           storage_cfg) -> None:
    os.environ["LOCAL_RANK"] = str(local)  # device "auto" picks this process's GPU
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    rank = base_rank * workers + local
    setup_logging("INFO", rank=rank)
    try:
        summary = run_rank(cfg, inputs, output, rank, base_world * workers, verify,
                           finalize=False, storage_cfg=storage_cfg)
        queue.put((local, summary, None))
    except ConfigError as exc:  # every worker meets the same one: the parent says it once
        queue.put((local, None, ("config", str(exc))))
        sys.exit(2)
    except BaseException as exc:  # report, then fail this process
        queue.put((local, None, ("error", f"{type(exc).__name__}: {exc}")))
        raise


def run_local_workers(cfg, inputs, output, workers, base_rank=0, base_world=1, verify=False,
                      storage_cfg=None):
    """Run ``workers`` processes, each preprocessing its rank's shards; their summaries."""
    ctx = mp.get_context("spawn")  # no fork of a process that may hold CUDA or threads
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child,
            args=(queue, cfg, inputs, output, i, workers, base_rank, base_world, verify,
                  storage_cfg),
            name=f"preprocess-{i}",
        )
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    results, errors, reported = {}, [], set()
    while len(reported) < workers:
        try:
            local, summary, error = queue.get(timeout=1.0)
        except queue_module.Empty:
            # A worker killed from outside (OOM killer, signal) never reports.
            for i, proc in enumerate(procs):
                if i not in reported and not proc.is_alive() and proc.exitcode not in (0, None):
                    reported.add(i)
                    errors.append(("error", f"worker {i}: exited with status {proc.exitcode}"))
            continue
        reported.add(local)
        if error:
            kind, text = error
            errors.append((kind, text if kind == "config" else f"worker {local}: {text}"))
        else:
            results[local] = summary
    for proc in procs:
        proc.join()
    config_errors = [text for kind, text in errors if kind == "config"]
    if config_errors:
        raise ConfigError(config_errors[0])
    if errors:
        raise RuntimeError("local preprocessing worker failed: "
                           + "; ".join(text for _, text in errors))
    return [results[i] for i in sorted(results)]
