"""The local launcher's judge of ranks that died or stopped (kept apart from local.py).

``RankWatchdog.judge`` is called by :func:`scaletrain.launch.local.launch_local` on every
poll. It decides when the whole job must end and with which status:

- a rank killed by a signal (SIGKILL from the OOM killer or a user, a segfault): the job is
  ended at once with EXIT_REQUEUE (75), the message naming the rank and its exit status.
  Its peers would otherwise wait in a collective until ``train.dist_timeout_s``;
- a rank whose heartbeat file (:mod:`scaletrain.core.heartbeat`) is older than the stall
  limit (SIGSTOP, a frozen process): the same, naming the rank;
- a rank that exited with an ordinary error status: if another rank is stopped, that rank
  is the cause (its peers' collectives timed out), so the same as above; otherwise the
  job fails with that status (a bug or bad input: a requeue would only repeat it).

75 means "try again": the next start resumes from the last complete checkpoint.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

from scaletrain.core.dist_env import EXIT_REQUEUE
from scaletrain.core.heartbeat import HEARTBEAT_DIR_ENV, beat_interval, stale_ranks


@dataclass(frozen=True)
class Verdict:
    status: int
    message: str


def _signal_name(status: int) -> str:
    try:
        return signal.Signals(status - 128).name
    except ValueError:
        return f"signal {status - 128}"


def _is_stopped(proc: Popen) -> bool:
    """True for a process in state T (stopped by SIGSTOP/SIGTSTP), read from /proc."""
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] in ("T", "t")


class RankWatchdog:
    """Heartbeats in ``directory``; a rank silent for ``stall_s`` seconds has stopped."""

    def __init__(self, directory: str | Path, stall_s: float) -> None:
        self.directory, self.stall_s = Path(directory), stall_s

    def prepare(self, nproc: int) -> dict[str, str]:
        """Clear the heartbeat files of an earlier start; the variables the ranks need."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for rank in range(nproc):
            (self.directory / f"rank_{rank}").unlink(missing_ok=True)
        return {HEARTBEAT_DIR_ENV: str(self.directory)}

    def _stalled(self, procs: Sequence[Popen], codes: Mapping[int, int],
                 stall_s: float) -> dict[int, float]:
        now = time.time()
        alive = {r for r, p in enumerate(procs) if r not in codes and p.poll() is None}
        # A rank that has not beaten yet is still importing (tens of seconds on a busy node)
        # and is not judged: one stuck there makes its peers' rendezvous time out, and the
        # rule for failures below then finds it stopped.
        return stale_ranks(self.directory, stall_s, now, ranks=alive)

    def judge(self, procs: Sequence[Popen], codes: Mapping[int, int],
              new: Mapping[int, int]) -> Verdict | None:
        """``codes``: every finished rank's status; ``new``: those finished since last time."""
        for rank, status in sorted(new.items()):
            if status > 128:
                return Verdict(EXIT_REQUEUE, (
                    f"rank {rank} died (exit status {status}, {_signal_name(status)}); ending "
                    f"the job for a requeue (exit {EXIT_REQUEUE})"))
        failed = {r: s for r, s in new.items() if s not in (0, EXIT_REQUEUE)}
        # After a peer's failure, a rank that has been silent for a few beats (or is in state
        # T) is the likelier cause: its peers' collectives timed out waiting for it.
        limit = self.stall_s if not failed else 3 * beat_interval(self.stall_s)
        stalled = self._stalled(procs, codes, limit)
        stalled.update({r: limit for r, p in enumerate(procs)
                        if failed and r not in codes and _is_stopped(p) and r not in stalled})
        if stalled:
            rank = min(stalled)
            return Verdict(EXIT_REQUEUE, (
                f"rank {rank} stopped making progress (no heartbeat for {stalled[rank]:.0f} s); "
                f"ending the job for a requeue (exit {EXIT_REQUEUE})"))
        if failed:
            rank = min(failed)
            return Verdict(failed[rank], (
                f"rank {rank} exited with status {failed[rank]}; stopping the other ranks"))
        return None
