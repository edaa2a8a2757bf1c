"""The stop signals, from the first instant of a training process.

SLURM preemption and ``scancel`` signal every process of a job step; Ctrl-C signals every
process of the terminal's foreground group. A training process records such a signal from
its first line of Python (:func:`install_early_handlers`, before torch and DeepSpeed are
imported: seconds on a busy node) so that a signal during start-up still ends in a
checkpoint and the requeue status instead of death by signal (143) and no requeue; the
trainer's :class:`scaletrain.train.signals.PreemptionFlag` takes the request over. DataLoader
workers ignore these signals (:func:`ignore_stop_signals`): the trainer decides, and a worker
killed under it would turn a preemption into a crash.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_early: list[signal.Signals] = []


def _record(signum: int, _frame) -> None:
    if not _early:
        _early.append(signal.Signals(signum))


def install_early_handlers() -> None:
    """Record the first stop signal from now on; also deliver any that the launcher held
    back (:func:`block_stop_signals`) while this process was starting."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def early_request() -> signal.Signals | None:
    """The stop signal received before the trainer's handlers took over, if any."""
    return _early[0] if _early else None


def block_stop_signals() -> None:
    """For a launcher's ``preexec_fn``: the mask survives exec, so a signal in the child's
    first milliseconds (before it installs handlers) waits instead of killing it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """A DataLoader ``worker_init_fn``: leave stop signals to the trainer."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
