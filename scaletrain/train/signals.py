"""Preemption: a signal asks the loop to checkpoint at the next step boundary and stop.

SLURM sends SIGUSR1 (``--signal=USR1@T``) or SIGTERM before killing a job, Ctrl-C sends
SIGINT (to the launcher, which forwards it, and to every rank); a handler only
sets a flag, because saving inside a signal handler would interrupt collectives half-way.
The loop all-reduces the flag (MAX) at each step boundary so every rank stops at the same
step, saves, and returns "preempted"; the CLI then exits with EXIT_REQUEUE, which the
launcher reads as "requeue me" (75 = EX_TEMPFAIL in sysexits.h: try again later).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

from scaletrain.core.signals import STOP_SIGNALS, early_request

PREEMPT_SIGNALS = STOP_SIGNALS

log = logging.getLogger(__name__)


class PreemptionFlag:
    """Install handlers for SIGUSR1/SIGTERM/SIGINT that record the request (or take over
    one received during start-up); restore on close(). Repeats are ignored: one Ctrl-C
    reaches a rank twice (from the terminal and from the launcher)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS) -> None:
        self.requested: signal.Signals | None = early_request()
        if self.requested is not None:
            log.warning("received %s during start-up: will checkpoint at the first step "
                        "boundary and stop", self.requested.name)
        self._previous: dict[signal.Signals, object] = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum)
            # Logging from a handler is safe enough here: CPython runs handlers between
            # bytecodes of the main thread, not truly asynchronously.
            log.warning("received %s: will checkpoint at the next step boundary and stop",
                        self.requested.name)

    @property
    def is_set(self) -> bool:
        return self.requested is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
