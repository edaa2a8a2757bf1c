"""The local launcher's watchdog with small worker scripts (no training): a rank killed by a
signal or stopped ends the whole job with EXIT_REQUEUE and one line naming the rank; an
ordinary failure keeps its status; a healthy job is untouched."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from scaletrain.core.dist_env import EXIT_REQUEUE
from scaletrain.launch.local import launch_local
from scaletrain.launch.watchdog import RankWatchdog

WORKER = """
import os, signal, sys, time
from scaletrain.core.heartbeat import HEARTBEAT_DIR_ENV, Heartbeat
rank, mode = int(os.environ["RANK"]), sys.argv[1]
# on_stall: this test judges the launcher alone, not rank 0's own watch.
with Heartbeat(os.environ[HEARTBEAT_DIR_ENV], rank, 2, float(sys.argv[2]),
               on_stall=lambda r, a: None):
    time.sleep(0.5)
    if rank == 1 and mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 1 and mode == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    if rank == 1 and mode == "fail":
        sys.exit(3)
    if mode == "ok":
        sys.exit(0)
    time.sleep(120)  # a survivor the launcher must end
"""


def _launch(tmp_path, mode: str, stall_s: float = 3.0) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return launch_local([mode, str(stall_s)], 2, env=env, poll_s=0.05,
                        program=[sys.executable, "-c", WORKER],
                        watchdog=RankWatchdog(tmp_path / "heartbeat", stall_s))


def _one_line(caplog, needle: str) -> str:
    lines = [r.getMessage() for r in caplog.records if needle in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


def test_killed_rank_is_named_with_its_status_and_the_job_requeues(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    t0 = time.monotonic()
    assert _launch(tmp_path, "kill") == EXIT_REQUEUE
    assert time.monotonic() - t0 < 60  # the survivor was ended, not waited for (120 s)
    line = _one_line(caplog, "rank 1 died")
    assert "exit status 137, SIGKILL" in line and f"exit {EXIT_REQUEUE}" in line


def test_stopped_rank_is_named_and_the_job_requeues(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    t0 = time.monotonic()
    assert _launch(tmp_path, "stop") == EXIT_REQUEUE
    assert time.monotonic() - t0 < 60
    _one_line(caplog, "rank 1 stopped making progress")


def test_ordinary_failure_keeps_its_status(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert _launch(tmp_path, "fail") == 3
    _one_line(caplog, "rank 1 exited with status 3")


def test_healthy_job_and_stale_files_of_an_earlier_start(tmp_path):
    beat = tmp_path / "heartbeat"
    beat.mkdir()
    old = beat / "rank_1"
    old.write_text("pid 1\n")
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # left by a killed start
    assert _launch(tmp_path, "ok", stall_s=10.0) == 0
    assert not list(beat.iterdir())  # ranks remove their files when they end


def test_a_rank_that_has_not_beaten_yet_is_not_judged(tmp_path):
    """Start-up (imports) can take longer than the stall limit on a busy node."""
    dog = RankWatchdog(tmp_path, stall_s=0.1)
    dog.prepare(1)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        assert dog.judge([proc], {}, {}) is None
        (tmp_path / "rank_0").touch()
        os.utime(tmp_path / "rank_0", (time.time() - 5, time.time() - 5))
        verdict = dog.judge([proc], {}, {})
        assert verdict is not None and verdict.status == EXIT_REQUEUE
        assert "rank 0 stopped making progress (no heartbeat for 5 s)" in verdict.message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


GROUP_WORKER = """
import os, sys, time
import torch, torch.distributed as dist
from scaletrain.core.dist_env import set_default_pg_timeout
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=set_default_pg_timeout(3))
group = dist.new_group([0, 1])  # no timeout given, as DeepSpeed creates its groups
flag = sys.argv[1]
if rank == 1:  # never joins the collective; leaves once rank 0 is done (or after 60 s)
    deadline = time.monotonic() + 60
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(0)
t0 = time.monotonic()
try:
    dist.all_reduce(torch.ones(1), group=group)
except RuntimeError as exc:
    print("collective failed after", round(time.monotonic() - t0, 1), "s:", exc)
    sys.stdout.flush()
    open(flag, "w").close()
    os._exit(0 if time.monotonic() - t0 < 50 else 1)
os._exit(2)
"""


@pytest.mark.slow
def test_groups_without_a_timeout_get_the_configured_one(tmp_path, capfd):
    """torch's default for new_group is 30 min; set_default_pg_timeout makes it ours."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    status = launch_local([str(tmp_path / "done")], 2, env=env, poll_s=0.05,
                          program=[sys.executable, "-c", GROUP_WORKER])
    out = capfd.readouterr().out
    assert "collective failed after" in out, out
    assert status == 0


# A rank of a SLURM job whose collective failed asks whether a peer died (its heartbeat
# file left behind, ageing) or ended with an ordinary error (file removed on the way out).
PEER = """
import os, signal, sys
from scaletrain.core.heartbeat import Heartbeat
with Heartbeat(sys.argv[1], 1, 2, 2.0, on_stall=lambda r, a: None):
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError("an ordinary bug")
"""


@pytest.mark.parametrize("how", ["kill", "error"])
def test_failed_peers_tells_a_dead_rank_from_an_ordinary_error(tmp_path, how):
    from scaletrain.core.heartbeat import failed_peers

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", PEER, str(tmp_path), how], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == (-signal.SIGKILL if how == "kill" else 1), proc.stderr
    peers = failed_peers(tmp_path, rank=0, stall_s=2.0)  # beats every 0.2 s
    if how == "kill":
        assert list(peers) == [1]  # a requeue may help
    else:
        assert peers == {}  # the job fails: a requeue would repeat the bug
