"""`scaletrain train CONFIG --run-dir DIR [--nproc N] [KEY=VALUE ...] [--dry-run]`.

With ``--nproc N`` this process is a launcher: it starts N local ranks
(:mod:`scaletrain.launch.local`) running this same command without ``--nproc``. Without it,
this process is one rank and reads its place from the environment (torchrun / SLURM
variables, or a single process).
Exit status: 0 done, 75 (EXIT_REQUEUE) preempted after a checkpoint (or, under srun, a peer
rank died or stopped: scaletrain.launch.jobs.dead_peer), 1 failed.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from pathlib import Path

from scaletrain.cli.common import add_config_arguments, resolve_config
from scaletrain.config import load_config
from scaletrain.core.config_base import ConfigError
from scaletrain.core.dist_env import EXIT_FAILED, EXIT_OK, EXIT_REQUEUE, dist_env_from_environ
from scaletrain.core.heartbeat import HEARTBEAT_DIR_ENV
from scaletrain.core.log import FILE_ONLY, add_log_file, setup_logging
from scaletrain.core.run_dir import (
    TRAIN_LOG,
    RunDirBusy,
    checkpoints_dir,
    find_latest,
    heartbeat_dir,
)
from scaletrain.launch.jobs import dead_peer
from scaletrain.launch.local import launch_local
from scaletrain.launch.watchdog import RankWatchdog
from scaletrain.train.checkpoint import CheckpointWriteError
from scaletrain.train.init_weights import check_init_source
from scaletrain.train.loop import NonFiniteTrainingError, run_training, slurm_heartbeat_dir
from scaletrain.train.preflight import check_data, check_run_dir

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--run-dir", required=True,
                        help="run directory: config, metrics and checkpoints (resumed if present)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="start N local processes (gloo on CPU, NCCL on GPU)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run: move an existing RUN_DIR aside to "
                             "RUN_DIR.old-TIMESTAMP (renamed, never deleted)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)  # validates eagerly, also in the launcher process
    if cfg is None:  # --dry-run printed the config; the start-up checks run too
        cfg = load_config(args.config, args.overrides)
        setup_logging(args.log_level)
        # No loader is built: the shards-per-slot warning of the run is said here.
        check_data(cfg, world_size=args.nproc or dist_env_from_environ().world_size)
        if not args.overwrite:
            check_run_dir(cfg, args.run_dir)
        return EXIT_OK
    if args.nproc is not None:
        # model.init_from that does not fit fails here, once, before any rank starts.
        setup_logging(args.log_level)
        check_data(cfg)
        # Once, here: the ranks started below find the old run already moved aside.
        check_run_dir(cfg, args.run_dir, overwrite=args.overwrite)
        check_init_source(cfg, args.run_dir)
        argv = ["train", args.config, "--run-dir", args.run_dir, "--log-level",
                args.log_level, *args.overrides]
        watchdog = RankWatchdog(heartbeat_dir(args.run_dir), cfg.train.dist_timeout_s)
        return launch_local(argv, args.nproc, hold_signals=True, watchdog=watchdog)

    env = dist_env_from_environ()
    rank = env.rank
    setup_logging(args.log_level, rank=rank)
    log_file = Path(args.run_dir) / TRAIN_LOG
    try:
        # Only rank 0 moves an old run aside; the others must not refuse what it moves.
        if rank == 0:
            check_data(cfg)
        if rank == 0 or not args.overwrite:
            check_run_dir(cfg, args.run_dir, overwrite=args.overwrite and rank == 0)
        if rank == 0:  # after the checks: a refused start leaves the run dir untouched
            add_log_file(log_file, rank)
            job = os.environ.get("SLURM_JOB_ID")
            log.info("scaletrain train %s --run-dir %s%s", args.config, args.run_dir,
                     f" (SLURM job {job})" if job else "")
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
    except Exception as exc:
        # Under srun (slurm/train.sbatch): a peer that died makes this a retryable failure;
        # 75 tells the script to requeue the job (scaletrain.launch.jobs.dead_peer).
        if env.source == "slurm" and not os.environ.get(HEARTBEAT_DIR_ENV):
            if dead_peer(exc, slurm_heartbeat_dir(args.run_dir), rank, env.world_size,
                         cfg.train.dist_timeout_s) is not None:
                return EXIT_REQUEUE
        if rank != 0 or not log_file.is_file():
            raise
        # The developer's traceback goes to the run's log file; the console gets one line.
        logging.getLogger(FILE_ONLY).error("training failed", exc_info=True)
        log.error("%s: %s (traceback in %s)", type(exc).__name__, exc, log_file)
        return EXIT_FAILED
    if outcome.status == "preempted":
        return EXIT_REQUEUE
    if rank == 0:
        for line in summary_lines(outcome, Path(args.run_dir)):
            log.info("%s", line)
    return EXIT_OK


def summary_lines(outcome, run_dir: Path) -> list[str]:
    """What a user wants at the end of a run: what was done, how fast, where things are,
    and what to run next."""
    rate = outcome.samples_run / outcome.seconds if outcome.seconds > 0 else float("nan")
    latest = find_latest(run_dir)
    lines = [
        f"done: step {outcome.step} ({outcome.steps_run} steps, {outcome.samples_run} samples "
        f"this job; {outcome.samples_seen} samples in all), wall time "
        f"{datetime.timedelta(seconds=round(outcome.seconds))}, {rate:.1f} samples/s mean, "
        f"{outcome.skipped_steps} skipped steps",
        f"checkpoints: {checkpoints_dir(run_dir)} (newest: {latest.name if latest else 'none'})",
    ]
    if outcome.last_grid:
        lines.append(f"last validation grid: {outcome.last_grid}")
    out = run_dir.parent / f"{run_dir.name}-export-step{outcome.step}"
    lines.append(f"next: scaletrain export {run_dir} --out {out}")
    return lines
