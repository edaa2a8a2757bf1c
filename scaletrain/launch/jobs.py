"""The callables submitit runs inside SLURM tasks.

Each is a small picklable object: submitit pickles it with its arguments at submission and
calls it in every task (one task per GPU for training, one per array index for
preprocessing).

How a training job survives preemption and time limits
------------------------------------------------------
SLURM delivers SIGUSR1 (``--signal=USR1@signal_delay_s`` before the time limit, or
``scancel --signal=USR1 JOB`` by hand) or SIGTERM (preemption, ``scontrol requeue``) to every
task. The trainer (``scaletrain.train.signals.PreemptionFlag``) turns either into a flag,
all ranks stop at the same step boundary, save a complete checkpoint, and ``run_training``
returns status "preempted". Only then does rank 0 run ``scontrol requeue``: the checkpoint
is on disk before SLURM kills anything. The requeued job runs the same pickled call, and the
trainer resumes from ``checkpoints/latest``.

submitit installs its own handler for its preemption signal at process start. We make that
signal SIGUSR1 too (SUBMITIT_PREEMPT_SIGNAL=USR1 in the batch script), so that before the
trainer has installed its handlers (imports, data set-up) submitit's path applies:
``TrainingJob.checkpoint`` returns the same call and submitit requeues it; once the trainer
is running its handler replaces submitit's, and the path above applies.

A rank that dies (killed, out of memory, its node lost) makes its peers' next collective
fail: at once when its sockets close, at the latest after ``train.dist_timeout_s``. A
surviving rank then looks at the job's heartbeat files (:mod:`scaletrain.core.heartbeat`): a
peer whose file was left behind and stopped being touched died or stopped, and the survivor
requeues the job (exit 75); it resumes from the last complete checkpoint. An ordinary error
in a rank removes that rank's file on its way out, so its peers let the job fail: a requeue
would only repeat it. Either way at most ``slurm.max_requeues`` restarts.

A job is requeued only while SLURM still reports it RUNNING: a ``scancel`` also sends
SIGTERM, and a cancelled job must stay cancelled (the checkpoint is saved all the same).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from scaletrain.core.dist_env import EXIT_REQUEUE, array_task_from_environ, dist_env_from_environ
from scaletrain.core.heartbeat import HEARTBEAT_DIR_ENV, STALL_ACTIONS, failed_peers
from scaletrain.core.log import setup_logging
from scaletrain.data.preprocess.output import finalize_index
from scaletrain.data.preprocess.pipeline import preprocess_shards
from scaletrain.launch.records import append_job_record
from scaletrain.launch.slurm_state import live_state
from scaletrain.train.loop import run_training, slurm_heartbeat_dir

logger = logging.getLogger(__name__)



def _address(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        return f"unresolved: {exc}"


def _job_id() -> str:
    return os.environ.get("SLURM_JOB_ID", "")


def _restart_count() -> int:
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def requeue_this_job(max_requeues: int) -> bool:
    """``scontrol requeue`` this job if it is still running; True when SLURM accepted."""
    job_id, restarts = _job_id(), _restart_count()
    if not job_id:
        logger.error("not in a SLURM job (no SLURM_JOB_ID): cannot requeue")
        return False
    if restarts >= max_requeues:
        logger.error(
            "job %s already restarted %d times (slurm.max_requeues=%d): not requeuing; "
            "submit again to continue from the last checkpoint", job_id, restarts, max_requeues,
        )
        return False
    state = live_state(job_id)
    if state != "RUNNING":
        # CANCELLED (scancel), or SLURM is already requeuing it (preemption): leave it.
        logger.warning("job %s is %s, not RUNNING: not requeuing it myself", job_id, state)
        return False
    proc = subprocess.run(
        ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        logger.error("scontrol requeue %s failed: %s", job_id, proc.stderr.strip())
        return False
    logger.warning("requeued job %s (restart %d); it resumes from the latest checkpoint",
                   job_id, restarts + 1)
    return True


def dead_peer(exc: BaseException, beats: Path, rank: int, world_size: int,
              stall_s: float) -> str | None:
    """Why this rank's training failed with ``exc``, when the cause is a peer that died or
    stopped (its heartbeat file in ``beats`` left behind, no longer touched): "rank R died
    or stopped (...)", said in one log line with the error, before the job ends for a
    requeue. None when every peer ended normally or still beats: an ordinary error then.
    Used by TrainingJob and by ``scaletrain train`` under srun (slurm/train.sbatch)."""
    if world_size == 1:
        return None
    peers = failed_peers(beats, rank, stall_s)
    if not peers:
        return None
    dead = min(peers)
    cause = f"rank {dead} died or stopped (no heartbeat for {peers[dead]:.0f} s)"
    error = (str(exc).strip().splitlines() or [""])[0][:200]
    logger.error("rank %d: %s: %s; %s: ending the job for a requeue (exit %d)", rank,
                 type(exc).__name__, error, cause, EXIT_REQUEUE)
    return cause


def _requeue_for(cause: str, cfg: Any, run_dir: str, is_main: bool, fields: dict) -> None:
    """A rank died or stopped: requeue the job (any surviving rank may, rank 0 may be the
    dead one; the first `scontrol requeue` wins and the job is no longer RUNNING for the
    others) and record it."""
    if requeue_this_job(cfg.slurm.max_requeues):
        append_job_record(run_dir, "requeued", cause=cause, **fields)
    elif is_main:
        append_job_record(run_dir, "failed", cause=cause, **fields)


class TrainingJob:
    """One training task: place this process in the job, train, requeue when preempted."""

    def __init__(self, entry: Callable = run_training) -> None:
        self.entry = entry  # tests pass a stand-in trainer with run_training's signature

    def __call__(self, cfg: Any, run_dir: str) -> Any:
        dist = dist_env_from_environ()
        # torch.distributed's env:// rendezvous and DeepSpeed read these.
        os.environ.update(dist.as_torch_env())

        setup_logging(rank=dist.rank)
        fields = dict(job_id=_job_id(), restart=_restart_count(), world_size=dist.world_size)
        if dist.is_main:
            append_job_record(run_dir, "started", master=f"{dist.master_addr}:{dist.master_port}",
                              **fields)
        # SLURM's node name, not uname: nodes may share a host name (containers).
        node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
        # Every rank, not only rank 0 (the others log warnings only): where each rank runs
        # and which master it dials is what a failed rendezvous across nodes needs.
        logger.log(logging.INFO if dist.is_main else logging.WARNING,
                   "rank %d/%d (local %d) on %s (%s), master %s (%s):%d", dist.rank,
                   dist.world_size, dist.local_rank, node, _address(node), dist.master_addr,
                   _address(dist.master_addr), dist.master_port)
        # Our torch variables above make the trainer see a torchrun-like environment: name
        # the job's heartbeat directory for it, as the local launcher does.
        beats = slurm_heartbeat_dir(run_dir)
        os.environ[HEARTBEAT_DIR_ENV] = str(beats)
        # Rank 0 ends a job whose rank stopped beating (core.heartbeat): requeue it first.
        STALL_ACTIONS.append(lambda rank, age: _requeue_for(
            f"rank {rank} stopped (no heartbeat for {age:.0f} s)", cfg, run_dir, dist.is_main,
            fields))
        try:
            outcome = self.entry(cfg, Path(run_dir))
        except Exception as exc:
            cause = dead_peer(exc, beats, dist.rank, dist.world_size,
                              cfg.train.dist_timeout_s)
            if cause is None:
                raise  # this rank's own error, or a peer's ordinary one: a requeue repeats it
            _requeue_for(cause, cfg, run_dir, dist.is_main, fields)
            raise SystemExit(EXIT_REQUEUE) from None
        status = getattr(outcome, "status", outcome)
        if status == "preempted":
            requeued = dist.is_main and requeue_this_job(cfg.slurm.max_requeues)
            if dist.is_main:
                append_job_record(run_dir, "requeued" if requeued else "preempted", **fields)
            # Leaving with an exception (not a return) keeps submitit from writing a result:
            # the job is not over, and its requeued run writes the real one.
            raise SystemExit(EXIT_REQUEUE)
        if dist.is_main:
            append_job_record(run_dir, str(status), **fields)
        return outcome

    def checkpoint(self, cfg: Any, run_dir: str):
        """submitit's preemption hook (before the trainer runs): rerun the same call.

        There is nothing to save here: the trainer resumes from its latest checkpoint.
        """
        logger.warning("signalled before training started: requeuing the same call")
        return submitit.helpers.DelayedSubmission(TrainingJob(self.entry), cfg, run_dir)


class PreprocessArrayTask:
    """One array task: encode this task's share of the raw shards (done shards are skipped)."""

    def __call__(self, preprocess_cfg: Any, inputs: list[str], output_dir: str) -> Any:
        setup_logging(rank=0)
        rank, world = array_task_from_environ()
        logger.info("array task %d of %d: %d input shards in all", rank, world, len(inputs))
        # The index is written once, by FinalizeIndexJob after every task succeeded.
        return preprocess_shards(preprocess_cfg, inputs, output_dir, rank, world,
                                 finalize=False)

    def checkpoint(self, preprocess_cfg: Any, inputs: list[str], output_dir: str):
        """Time limit or preemption: run again; finished shards are skipped."""
        return submitit.helpers.DelayedSubmission(
            PreprocessArrayTask(), preprocess_cfg, inputs, output_dir
        )


class FinalizeIndexJob:
    """Runs after every array task succeeded: write the dataset index over all shards."""

    def __call__(self, output_dir: str) -> Any:
        setup_logging(rank=0)
        index = finalize_index(output_dir)
        if not index.get("complete", True):
            # A failed job (not a quiet success) tells the submitter to resubmit the array.
            raise RuntimeError(
                f"{output_dir}/index.json is incomplete (missing or failed shards listed in "
                "it): submit the same array again to redo only those"
            )
        return index
