"""The order of a checkpoint's writes as the kernel sees it (issue 14): every file's
contents and every directory entry reach stable storage before the COMPLETE marker, the
marker before the rename to step_N, the rename before `latest`. A power loss cannot be
simulated here; the system calls of a real 1-rank training, traced with strace, can."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from .conftest import explain, train_command, train_env

pytestmark = pytest.mark.slow

# strace -y prints a descriptor with its path: fsync(7</run/checkpoints/.tmp_step_1/x.pt>)
FSYNC = re.compile(r"\bfsync\(\d+<([^>]*)>\)\s+=\s+0")
RENAME = re.compile(r'\brename(?:at2?)?\((?:[^,]*, )?"([^"]+)", (?:[^,]*, )?"([^"]+)"')


def _strace() -> str:
    path = shutil.which("strace")
    if path is None and os.environ.get("CI") == "true" and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "strace"], check=False,
                       capture_output=True, timeout=300)
        path = shutil.which("strace")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("strace is needed (apt-get install strace)")
        pytest.skip("strace is not installed")
    return path


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoint_bytes_reach_the_disk_before_its_marker(tmp_path, async_save):
    """Also with checkpoint.async_save: the background thread's writes keep the order."""
    trace = tmp_path / "trace.txt"
    run_dir = tmp_path / "run"
    cmd = [_strace(), "-f", "-qq", "-y", "-e", "trace=fsync,rename,renameat,renameat2",
           "-e", "signal=none", "-o", str(trace),
           *train_command(run_dir, ["train.max_steps=1", "checkpoint.every=1",
                                    f"checkpoint.async_save={async_save}"], nproc=1)]
    proc = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, explain(proc)
    (final,) = sorted((run_dir / "checkpoints").glob("step_*"))
    events: list[tuple[int, str]] = []  # (line, path) of every successful fsync
    renames: list[tuple[int, str, str]] = []
    for i, line in enumerate(trace.read_text().splitlines()):
        if m := FSYNC.search(line):
            events.append((i, os.path.realpath(m.group(1))))
        elif m := RENAME.search(line):
            renames.append((i, os.path.realpath(m.group(1)), os.path.realpath(m.group(2))))
    first_fsync: dict[str, int] = {}
    for i, path in events:
        first_fsync.setdefault(path, i)
    for i, src, dst in renames:  # a file fsynced under a temporary name, then renamed
        if src in first_fsync and first_fsync[src] < i:
            first_fsync.setdefault(dst, first_fsync[src])
    # The checkpoint directory is written as .tmp_step_N and renamed to step_N at the end.
    (commit_at, tmp_name), = [(i, src) for i, src, dst in renames
                              if dst == os.path.realpath(final)]
    (marker_at,) = [i for i, _, dst in renames if dst == f"{tmp_name}/COMPLETE"]
    assert marker_at < commit_at
    for root, dirs, files in os.walk(final):
        rel_root = os.path.relpath(root, final)
        for name in [*dirs, *files]:
            if name == "COMPLETE":
                continue
            path = os.path.normpath(os.path.join(tmp_name, rel_root, name))
            assert path in first_fsync, f"{rel_root}/{name} was never fsynced"
            assert first_fsync[path] < marker_at, f"{rel_root}/{name} fsynced after COMPLETE"
    assert first_fsync.get(tmp_name, marker_at) < marker_at  # the checkpoint's own entries
    parent = os.path.realpath(run_dir / "checkpoints")
    assert any(path == parent and i > commit_at for i, path in events), \
        "the checkpoints directory was not fsynced after the rename"
    assert any(dst == f"{parent}/latest" and i > commit_at for i, _, dst in renames)
