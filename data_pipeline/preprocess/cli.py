"""`scaletrain preprocess CONFIG --input PATTERN --output DIR [--workers N]`.

Rank and world come from the environment (SLURM array, torchrun/srun; see
:mod:`data_pipeline.preprocess.work`); ``--workers N`` runs N local processes, each a rank
of its own, nested inside that. Exit status: 0 when every assigned shard is complete, 1
when some shard could not be read (rerun to retry it), 2 for a config error.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import queue as queue_module
import sys

from scaletrain.cli import add_config_arguments, resolve_config

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--input",
        action="append",
        metavar="PATTERN",
        help="raw shards: a brace pattern like 'data/{00000..00099}.tar', a glob, a '::' "
        "list or a 'pipe:' URL (repeatable)",
    )
    parser.add_argument("--output", metavar="DIR", help="latent shard directory (required)")
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N", help="local processes, one rank each"
    )
    parser.add_argument(
        "--verify", action="store_true", help="re-hash complete shards before skipping them"
    )
    parser.add_argument(
        "--finalize-only",
        action="store_true",
        help="only rebuild index.json and errors.jsonl from the manifests (after a job array)",
    )


def main(args: argparse.Namespace) -> int:
    from scaletrain.log import setup_logging

    setup_logging("INFO")
    from data_pipeline.preprocess.output import finalize_index

    if args.finalize_only and args.output:
        index = finalize_index(args.output)
        _print_index(args.output, index)
        return 0 if index["complete"] else 1
    root = resolve_config(args)
    if root is None:  # --dry-run printed the config
        return 0
    for flag, value in (("--output DIR", args.output), ("--input PATTERN", args.input)):
        if not value:
            print(f"scaletrain preprocess: {flag} is required", file=sys.stderr)
            return 2
    if args.workers < 1:
        print("scaletrain preprocess: --workers must be >= 1", file=sys.stderr)
        return 2
    from data_pipeline.preprocess.pipeline import PreprocessSummary
    from data_pipeline.preprocess.work import resolve_rank_world

    cfg = root.preprocess
    base_rank, base_world, source = resolve_rank_world()
    log.info(
        "rank %d of %d (from %s), %d local worker(s)", base_rank, base_world, source, args.workers
    )
    if args.workers == 1:
        summary = _run_rank(cfg, args.input, args.output, base_rank, base_world, args.verify)
    else:
        summary = PreprocessSummary.merge(
            run_local_workers(
                cfg, args.input, args.output, args.workers, base_rank, base_world, args.verify
            )
        )
    index = finalize_index(args.output)
    print(summary.describe())
    _print_index(args.output, index)
    return 1 if summary.shards_failed else 0


def _print_index(output: str, index: dict) -> None:
    state = "complete" if index["complete"] else f"incomplete, {len(index['missing'])} missing"
    print(
        f"index {os.path.join(output, 'index.json')}: {index['num_shards']} shards, "
        f"{index['num_samples']} samples, {index['num_skipped']} skipped ({state})"
    )


def _run_rank(cfg, inputs, output, rank, world, verify, finalize=True):
    from data_pipeline.encoders.common import quiet_hub_libraries
    from data_pipeline.preprocess.pipeline import preprocess_shards

    quiet_hub_libraries()
    return preprocess_shards(
        cfg, inputs, output, rank=rank, world=world, finalize=finalize, verify=verify
    )


def _child(queue, cfg, inputs, output, local, workers, base_rank, base_world, verify) -> None:
    import torch

    from scaletrain.log import setup_logging

    os.environ["LOCAL_RANK"] = str(local)  # device "auto" picks this process's GPU
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    rank = base_rank * workers + local
    setup_logging("INFO", rank=rank)
    try:
        summary = _run_rank(cfg, inputs, output, rank, base_world * workers, verify, finalize=False)
        queue.put((local, summary, None))
    except BaseException as exc:  # report, then fail this process
        queue.put((local, None, f"{type(exc).__name__}: {exc}"))
        raise


def run_local_workers(cfg, inputs, output, workers, base_rank=0, base_world=1, verify=False):
    """Run ``workers`` processes, each preprocessing its rank's shards; their summaries."""
    ctx = mp.get_context("spawn")  # no fork of a process that may hold CUDA or threads
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child,
            args=(queue, cfg, inputs, output, i, workers, base_rank, base_world, verify),
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
                    errors.append(f"worker {i}: exited with status {proc.exitcode}")
            continue
        reported.add(local)
        if error:
            errors.append(f"worker {local}: {error}")
        else:
            results[local] = summary
    for proc in procs:
        proc.join()
    if errors:
        raise RuntimeError("local preprocessing worker failed: " + "; ".join(errors))
    return [results[i] for i in sorted(results)]


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="python -m data_pipeline.preprocess.cli")
    add_arguments(p)
    sys.exit(main(p.parse_intermixed_args()))
