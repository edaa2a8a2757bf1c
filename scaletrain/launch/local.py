"""Run N training processes on this machine, the way torchrun would, without torchrun.

``launch_local(argv, nproc)`` starts ``python -m scaletrain.cli *argv`` N times with RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT,
lets their output stream through (they inherit stdout/stderr), and waits. If one worker
fails the others are killed at once: a survivor would otherwise block forever in a
collective waiting for its dead peer. SIGTERM/SIGUSR1/SIGINT sent to the launcher are
forwarded to the workers, which checkpoint and exit with EXIT_REQUEUE; a second SIGINT
(Ctrl-C twice) kills them at once (status 130).

Combined exit status: the first failure's status (128 + signal number for a worker killed
by a signal); else EXIT_REQUEUE if any worker was preempted; else 0.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from scaletrain.core.dist_env import EXIT_REQUEUE, free_port
from scaletrain.core.signals import block_stop_signals, early_request
from scaletrain.launch.watchdog import RankWatchdog

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def threads_per_worker(nproc: int, cpu_count: int | None = None) -> int:
    """Intra-op threads per worker so that N workers together use each core once.

    Without a limit every worker starts one thread per core, N times too many: on a small
    machine they spin against each other and a step takes several times longer (torchrun
    sets OMP_NUM_THREADS=1 for the same reason).
    """
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, cores // max(1, nproc))


def worker_env(rank: int, nproc: int, port: int, base: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if not k.startswith("SLURM_")}
    env.update(
        RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # A user's own setting wins; otherwise share the cores out.
    env.setdefault("OMP_NUM_THREADS", str(threads_per_worker(nproc)))
    return env


def rank_preexec(parent_pid: int, hold: bool):
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when the launcher dies
    (prctl PR_SET_PDEATHSIG; Linux only, a no-op elsewhere): a launcher killed with
    SIGKILL cannot stop its ranks, which would otherwise train on as orphans. With ``hold``
    stop signals are blocked until the rank installs its handlers (scaletrain's CLI does)."""
    def set_pdeathsig() -> None:
        if hold:
            block_stop_signals()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent_pid:  # the launcher died before prctl took effect
            os._exit(1)
    return set_pdeathsig


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _status(code: int) -> int:
    return 128 - code if code < 0 else code  # Popen reports death by signal N as -N


def _judge(procs, codes, new, watchdog: RankWatchdog | None) -> int | None:
    """The job's status if it must end now (the others are then killed), else None."""
    if watchdog is not None:
        verdict = watchdog.judge(procs, codes, new)
        if verdict is not None:
            log.error("%s", verdict.message)
            return verdict.status
        return None
    failed = [(rank, code) for rank, code in sorted(new.items())
              if code not in (0, EXIT_REQUEUE)]
    if failed:
        rank, code = failed[0]
        log.error("rank %d exited with status %d; stopping the other ranks", rank, code)
        return code
    return None


def launch_local(argv: Sequence[str], nproc: int, env: Mapping[str, str] | None = None,
                 poll_s: float = 0.2, program: Sequence[str] | None = None,
                 hold_signals: bool = False, watchdog: RankWatchdog | None = None) -> int:
    """Run ``python -m scaletrain.cli *argv`` as ``nproc`` ranks; return the combined status.

    ``program`` replaces ``python -m scaletrain.cli`` (tests run small scripts instead).
    ``hold_signals``: the ranks start with stop signals blocked and unblock them once their
    handlers are in (``scaletrain train`` does, first thing).
    ``watchdog`` (see :mod:`scaletrain.launch.watchdog`) turns a rank that died by a signal
    or stopped beating into EXIT_REQUEUE with a message naming it.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    base = dict(os.environ if env is None else env)
    if watchdog is not None:
        base.update(watchdog.prepare(nproc))
    port = free_port()
    cmd = [*(program or (sys.executable, "-m", "scaletrain.cli")), *argv]
    if early_request() is not None:  # stopped before any rank started: nothing to save
        log.warning("received %s before the ranks started; exiting for requeue",
                    early_request().name)
        return EXIT_REQUEUE
    procs = [subprocess.Popen(cmd, env=worker_env(r, nproc, port, base),
                              preexec_fn=rank_preexec(os.getpid(), hold=hold_signals))
             for r in range(nproc)]
    interrupts: list[int] = []

    def forward(signum, _frame):
        interrupts.append(signum)
        if interrupts.count(signal.SIGINT) >= 2:  # a second Ctrl-C: stop at once
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    if early_request() is not None:  # arrived while the ranks were being started
        forward(early_request(), None)
    codes: dict[int, int] = {}
    failure: int | None = None
    try:
        while len(codes) < nproc:
            new = {rank: _status(p.returncode) for rank, p in enumerate(procs)
                   if rank not in codes and p.poll() is not None}
            codes.update(new)
            if failure is None:
                failure = _judge(procs, codes, new, watchdog)
                if failure is not None:
                    for other in procs:
                        if other.poll() is None:
                            other.kill()
            time.sleep(poll_s)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupts.count(signal.SIGINT) >= 2:
        log.warning("interrupted twice: ranks stopped without a checkpoint")
        return 128 + signal.SIGINT
    if failure is not None:
        return failure
    return EXIT_REQUEUE if EXIT_REQUEUE in codes.values() else 0
