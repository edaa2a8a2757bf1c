"""`scaletrain preprocess CONFIG --input PATTERN --output DIR [--workers N]`.

Rank and world come from the environment (SLURM array, torchrun/srun; see
:mod:`scaletrain.data.preprocess.work`); ``--workers N`` runs N local processes, each a rank
of its own, nested inside that. Exit status: 0 when every assigned shard is complete, 1
when some shard could not be read (rerun to retry it), 2 for a config error.
"""

from __future__ import annotations

import argparse
import logging
import sys

from scaletrain.cli.common import add_config_arguments, resolve_config
from scaletrain.core.log import setup_logging
from scaletrain.data import storage
from scaletrain.data.preprocess.local import run_local_workers, run_rank
from scaletrain.data.preprocess.output import check_same_config, describe_sizes, finalize_index
from scaletrain.data.preprocess.pipeline import PreprocessSummary
from scaletrain.data.preprocess.work import check_output_apart, expand_inputs, resolve_rank_world

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--input",
        action="append",
        metavar="PATTERN",
        help="raw shards: a brace pattern like 'data/{00000..00099}.tar' (also as an "
        "s3:// URL), a glob, a '::' list or a 'pipe:' URL (repeatable)",
    )
    parser.add_argument("--output", metavar="DIR",
                        help="latent shard directory or URL prefix, e.g. s3://bucket/latents "
                        "(required); endpoint and credentials as for data.storage")
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
    setup_logging("INFO")
    root = resolve_config(args)
    if root is None:  # --dry-run printed the config
        return 0
    store = root.data.storage
    if args.output:
        storage.check_url(args.output, "--output")
    if args.finalize_only and args.output:
        index = finalize_index(args.output, store)
        _print_index(args.output, index)
        return 0 if index["complete"] else 1
    for flag, value in (("--output DIR", args.output), ("--input PATTERN", args.input)):
        if not value:
            print(f"scaletrain preprocess: {flag} is required", file=sys.stderr)
            return 2
    if args.workers < 1:
        print("scaletrain preprocess: --workers must be >= 1", file=sys.stderr)
        return 2
    cfg = root.preprocess
    # Before any input is listed or worker started: an output holding shards of another
    # config, or overlapping the inputs' folder, is refused here in one line.
    check_same_config(args.output, cfg, store)
    check_output_apart(args.output, expand_inputs(args.input, store))
    base_rank, base_world, source = resolve_rank_world()
    log.info(
        "rank %d of %d (from %s), %d local worker(s)", base_rank, base_world, source, args.workers
    )
    if args.workers == 1:
        summary = run_rank(cfg, args.input, args.output, base_rank, base_world, args.verify,
                           storage_cfg=store)
    else:
        summary = PreprocessSummary.merge(
            run_local_workers(
                cfg, args.input, args.output, args.workers, base_rank, base_world, args.verify,
                store,
            )
        )
    index = finalize_index(args.output, store)
    print(summary.describe())
    _print_index(args.output, index)
    return 1 if summary.shards_failed else 0


def _print_index(output: str, index: dict) -> None:
    state = "complete" if index["complete"] else f"incomplete, {len(index['missing'])} missing"
    print(
        f"index {storage.join(output, 'index.json')}: {index['num_shards']} shards, "
        f"{index['num_samples']} samples, {index['num_skipped']} skipped ({state})"
    )
    for line in describe_sizes(index):
        print(line)
