"""Per-rank heartbeat files, so that a rank that stopped (SIGSTOP, a frozen node) is noticed.

Each rank runs a daemon thread that touches ``<dir>/rank_<R>`` every few seconds. The thread
keeps beating while the main thread waits in a collective (the collective has its own
timeout, ``train.dist_timeout_s``); it stops only when the whole process stops. Two
watchers read the files:

- the local launcher (:mod:`scaletrain.launch.watchdog`), which sees every rank of the job;
- rank 0 itself, for jobs without our launcher (SLURM starts the ranks through srun): a rank
  whose file is older than the stall limit ends the job with EXIT_REQUEUE, so SLURM
  requeues it instead of every peer waiting until the time limit.

Only files that exist are judged: a rank removes its own file when it ends normally.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from scaletrain.core.dist_env import EXIT_REQUEUE

log = logging.getLogger(__name__)

HEARTBEAT_DIR_ENV = "SCALETRAIN_HEARTBEAT_DIR"


def heartbeat_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank_{rank}"


def beat_interval(stall_s: float) -> float:
    """Often enough that a healthy rank is never close to the stall limit."""
    return max(0.2, min(10.0, stall_s / 10))


def stale_ranks(directory: str | Path, stall_s: float, now: float | None = None,
                ranks=None) -> dict[int, float]:
    """{rank: seconds since its last beat} for existing files older than ``stall_s``."""
    now = time.time() if now is None else now
    out: dict[int, float] = {}
    for path in Path(directory).glob("rank_*"):
        try:
            rank = int(path.name.removeprefix("rank_"))
            age = now - path.stat().st_mtime
        except (ValueError, OSError):  # not ours, or removed while we looked
            continue
        if age > stall_s and (ranks is None or rank in ranks):
            out[rank] = age
    return out


def failed_peers(directory: str | Path, rank: int, stall_s: float) -> dict[int, float]:
    """After this rank's collective failed: the peers that died or stopped, as
    {rank: seconds since its last beat}; {} when every peer ended normally or still beats.

    A rank that ends, normally or by an exception, removes its file (``Heartbeat.__exit__``);
    one that was killed (SIGKILL, the OOM killer, its node lost) or stopped leaves it behind,
    ageing. A file is judged after it has missed three beats, as the local launcher judges
    (:mod:`scaletrain.launch.watchdog`), so this waits up to three beat intervals (30 s at
    most) for a freshly dead peer's file to age.
    """
    interval = beat_interval(stall_s)
    limit = 3 * interval
    deadline = time.monotonic() + limit + interval
    while True:
        stale = {r: age for r, age in stale_ranks(directory, limit).items() if r != rank}
        if stale or time.monotonic() > deadline:
            return stale
        time.sleep(interval / 2)


# Called as action(rank, age) before rank 0 ends a job whose rank stopped: a SLURM job
# requeues itself here (scaletrain.launch.jobs); the local launcher watches its ranks itself.
STALL_ACTIONS: list[Callable[[int, float], object]] = []


def _stop_job(rank: int, age: float) -> None:
    log.error("rank %d stopped making progress (no heartbeat for %.0f s); ending the job "
              "for a requeue (exit %d)", rank, age, EXIT_REQUEUE)
    for action in STALL_ACTIONS:
        try:
            action(rank, age)
        except Exception as exc:  # the exit below must happen regardless
            log.error("before ending the job: %s", exc)
    logging.shutdown()
    # os._exit: the main thread may be blocked in a collective that would never return.
    os._exit(EXIT_REQUEUE)


class Heartbeat:
    """``with Heartbeat(dir, rank, world, stall_s):`` beats until the block ends."""

    def __init__(self, directory: str | Path, rank: int, world_size: int, stall_s: float,
                 on_stall: Callable[[int, float], None] = _stop_job) -> None:
        self.path = heartbeat_file(directory, rank)
        self.rank, self.world_size, self.stall_s = rank, world_size, stall_s
        self.on_stall = on_stall
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Who beats here, for a person (or test) looking for the process behind a rank.
        self.path.write_text(f"pid {os.getpid()} host {socket.gethostname()}\n")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)  # ended: nothing for a watcher to judge

    def _touch(self) -> None:
        os.utime(self.path)

    def _run(self) -> None:
        interval = beat_interval(self.stall_s)
        while not self._stop.wait(interval):
            try:
                self._touch()
            except OSError as exc:  # a full or flaky disk must not kill training
                log.debug("heartbeat %s: %s", self.path, exc)
            if self.rank == 0 and self.world_size > 1:
                others = set(range(1, self.world_size))
                stale = stale_ranks(self.path.parent, self.stall_s, ranks=others)
                if stale:
                    rank = min(stale)
                    self.on_stall(rank, stale[rank])
