"""`scaletrain train CONFIG --run-dir DIR [--nproc N] [KEY=VALUE ...] [--dry-run]`.

With ``--nproc N`` this process is a launcher: it starts N local ranks
(:mod:`scaletrain.launch.local`) running this same command without ``--nproc``. Without it,
this process is one rank and reads its place from the environment (torchrun / SLURM
variables, or a single process).
Exit status: 0 done, 75 (EXIT_REQUEUE) preempted after a checkpoint, 1 failed.
"""

from __future__ import annotations

import argparse
import logging

from scaletrain.cli.common import add_config_arguments, resolve_config
from scaletrain.core.config_base import ConfigError
from scaletrain.core.dist_env import EXIT_FAILED, EXIT_OK, EXIT_REQUEUE, dist_env_from_environ
from scaletrain.core.log import setup_logging
from scaletrain.core.run_dir import RunDirBusy
from scaletrain.launch.local import launch_local
from scaletrain.train.checkpoint import CheckpointWriteError
from scaletrain.train.init_weights import check_init_source
from scaletrain.train.loop import NonFiniteTrainingError, run_training

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--run-dir", required=True,
                        help="run directory: config, metrics and checkpoints (resumed if present)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="start N local processes (gloo on CPU, NCCL on GPU)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)  # validates eagerly, also in the launcher process
    if cfg is None:
        return EXIT_OK
    if args.nproc is not None:
        # model.init_from that does not fit fails here, once, before any rank starts.
        setup_logging(args.log_level)
        check_init_source(cfg, args.run_dir)
        argv = ["train", args.config, "--run-dir", args.run_dir, "--log-level",
                args.log_level, *args.overrides]
        return launch_local(argv, args.nproc, hold_signals=True)

    rank = dist_env_from_environ().rank
    setup_logging(args.log_level, rank=rank)
    try:
        outcome = run_training(cfg, args.run_dir)
    except (NonFiniteTrainingError, CheckpointWriteError, RunDirBusy) as exc:
        # Every rank that raises it has the same message: rank 0 says it once.
        log.log(logging.ERROR if rank == 0 else logging.DEBUG, "%s", exc)
        return EXIT_FAILED
    except ConfigError as exc:
        if rank != 0:  # every rank finds the same problem; rank 0 prints it
            log.debug("%s", exc)
            return EXIT_FAILED
        raise
    if outcome.status == "preempted":
        return EXIT_REQUEUE
    log.info("done: step %d, %d samples seen", outcome.step, outcome.samples_seen)
    return EXIT_OK
