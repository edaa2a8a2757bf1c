"""Ask SLURM about a job: squeue for live jobs, sacct (needs accounting) for finished ones."""

from __future__ import annotations

import subprocess
import time

# States after which a job will not run again by itself (sacct / squeue spelling).
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED",
})


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def live_state(job_id: str) -> str | None:
    """The squeue state (PENDING, RUNNING, COMPLETING, ...) or None once squeue forgets it."""
    try:
        proc = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
    except (OSError, subprocess.SubprocessError):
        return None
    states = [s.strip() for s in proc.stdout.splitlines() if s.strip()]
    if proc.returncode != 0 or not states:
        return None
    return states[0]


def accounting_states(job_id: str, all_runs: bool = False) -> list[str]:
    """sacct states of the job's allocation; with ``all_runs`` one per run (requeues show
    as REQUEUED lines before the last). "CANCELLED by 0" is reported as CANCELLED."""
    cmd = ["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State"]
    if all_runs:
        cmd.insert(1, "-D")
    proc = _run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def job_state(job_id: str) -> str | None:
    """The job's current state: squeue's while it lives, else sacct's last record."""
    state = live_state(job_id)
    if state is not None:
        return state
    states = accounting_states(job_id)
    return states[-1] if states else None


def wait_for_terminal(job_id: str, timeout: float, poll: float = 1.0) -> str:
    """Poll until the job reaches a terminal state and return it (TimeoutError otherwise)."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        if live_state(job_id) is None:
            states = accounting_states(job_id)
            state = states[-1] if states else None
            if state in TERMINAL_STATES:
                return state
        time.sleep(poll)
    raise TimeoutError(f"SLURM job {job_id} not finished after {timeout:.0f} s (state {state})")
