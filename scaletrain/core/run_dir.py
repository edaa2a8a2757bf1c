"""What a run directory holds and where: the layout that training writes and everything else
(export, evaluation, the SLURM records, a resumed run) reads.

    RUN_DIR/config.yaml                 the resolved config of the run
    RUN_DIR/metrics.jsonl               metrics, one JSON line per logged step
    RUN_DIR/train.log                   rank 0's console log of every job (with tracebacks)
    RUN_DIR/eval/                       evaluation's cache (FID reference statistics)
    RUN_DIR/checkpoints/step_{N:09d}/   one complete checkpoint (see scaletrain.train.checkpoint)
    RUN_DIR/checkpoints/latest          the name of the newest complete checkpoint
    RUN_DIR/slurm/                      SLURM job records and logs (scaletrain.launch.records)
    RUN_DIR/heartbeat/                  one file per live rank (scaletrain.core.heartbeat)

A checkpoint directory is complete once its ``COMPLETE`` marker is written (last, after every
other file). Its ``manifest.json`` (written just before the marker) records the size and sha256
of every other file, so a resume can tell a damaged checkpoint from a good one
(:func:`verify_files`) and fall back to an older one instead of crashing or training on
flipped bytes. ``latest`` is a hint for people and tools; the scan of complete directories
decides, so a crash between the rename of a checkpoint and the rewrite of ``latest`` (or a
stale ``latest``) cannot lose a step.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scaletrain.core.files import sha256_file

CONFIG = "config.yaml"
TRAIN_LOG = "train.log"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MARKER = "COMPLETE"
STATE = "state.json"
MANIFEST = "manifest.json"
LOCK = ".lock"  # held (flock) by the training that owns the run dir
CORRUPT_SUFFIX = ".corrupt"
TMP_PREFIX = ".tmp_"
STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:09d}"


def rank_file(kind: str, rank: int) -> str:
    """Where rank ``rank`` keeps its part of ``kind`` (ema, data, rng) inside a checkpoint."""
    return f"{kind}/rank_{rank:05d}.pt"


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval"


def heartbeat_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "heartbeat"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / STATE).is_file()


def checkpoint_step(path: Path) -> int | None:
    """N of a ``step_N`` directory name, or None for any other name."""
    suffix = path.name[len(STEP_PREFIX):]
    return int(suffix) if path.name.startswith(STEP_PREFIX) and suffix.isdigit() else None


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.glob(STEP_PREFIX + "*"):
        step = checkpoint_step(path)
        if step is not None and path.is_dir() and is_complete(path):
            found.append((step, path))
    return [p for _, p in sorted(found)]


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def is_healthy(ckpt: Path) -> bool:
    """Whether a checkpoint passed the health checks when it was saved (weight and EMA norms
    finite and bounded, no loss spike since the previous one); older ones count as healthy."""
    try:
        return bool(read_state(ckpt).get("healthy", True))
    except (OSError, ValueError):
        return False


def newest_healthy(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint that passed the health checks, or None."""
    for path in reversed(complete_checkpoints(run_dir)):
        if is_healthy(path):
            return path
    return None


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A checkpoint directory from a run dir (newest or ``step``) or a checkpoint dir itself."""
    path = Path(path)
    if is_complete(path):
        return path
    if step is not None:
        candidate = checkpoints_dir(path) / step_dir_name(step)
        if not is_complete(candidate):
            raise FileNotFoundError(f"{candidate}: no complete checkpoint for step {step}")
        return candidate
    latest = find_latest(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (looked in {CHECKPOINTS}/)")
    return latest


def read_state(ckpt: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint: step, samples seen, world size, ZeRO stage, ..."""
    return json.loads((ckpt / STATE).read_text(encoding="utf-8"))


def rank_files(ckpt: Path, kind: str) -> list[Path]:
    """Every rank's file of ``kind`` in a checkpoint, in rank order."""
    files = sorted((ckpt / kind).glob("rank_*.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt / kind}: no per-rank files")
    return files


# --------------------------------------------------------------------------- checksums


def checkpoint_files(ckpt: Path) -> list[str]:
    """Every file of a checkpoint the manifest covers (paths relative to it, sorted): all but
    the manifest and the marker, which are written after it."""
    out = []
    for dirpath, _dirs, files in os.walk(ckpt):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), ckpt)
            if rel not in (MANIFEST, MARKER):
                out.append(rel)
    return sorted(out)


def share(items: list[str], rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s round-robin share of ``items``: hashing a checkpoint is spread over
    every rank, so it costs one read of 1/world of the bytes per rank."""
    return items[rank::world_size]


def hash_files(ckpt: Path, rels: list[str], fsync: bool = True) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file; with ``fsync`` also flush it to stable storage, since
    the bytes are being read anyway (a checkpoint is durable before its marker exists)."""
    out = {}
    for rel in rels:
        path = ckpt / rel
        if fsync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        out[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def read_manifest(ckpt: Path) -> dict[str, dict[str, Any]] | None:
    """The checksums of a checkpoint, or None for one written before manifests existed.
    An unreadable manifest reads as empty, which :func:`verify_files` reports."""
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        return files if isinstance(files, dict) else {}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return {}


def verify_files(ckpt: Path, manifest: dict[str, dict[str, Any]], rels: list[str]
                 ) -> list[str]:
    """Check ``rels`` of ``ckpt`` against its manifest; one reason per damaged file."""
    problems = []
    if not manifest:
        return [f"{ckpt / MANIFEST}: unreadable or empty"]
    for rel in rels:
        path, want = ckpt / rel, manifest[rel]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{path}: {size} bytes, {want['size']} expected (truncated?)")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{path}: sha256 mismatch (bytes changed since the save)")
    return problems


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the way (never delete a user's bytes): the scan
    for complete checkpoints no longer sees it, and a person can still inspect it."""
    target = ckpt.with_name(ckpt.name + CORRUPT_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}{CORRUPT_SUFFIX}-{n}")
    ckpt.rename(target)
    return target


# --------------------------------------------------------------------------- run lock


class RunDirBusy(RuntimeError):
    """Another training holds the run directory's lock."""


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive flock on ``RUN_DIR/.lock`` for the life of a training, so that a
    second training on the same run dir (an orphan of a killed launcher, a double submit)
    is refused instead of interleaving checkpoints. The lock dies with its process, so a
    crash never leaves a stale lock; the file (never deleted: that would race) names the
    holder for the refusal message."""
    path = Path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
            raise RunDirBusy(
                f"{run_dir} is in use by another training ({holder}); stop it or use "
                "another --run-dir") from None
        started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n"
                  .encode(), 0)
        yield path
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- readers


class CheckpointGone(FileNotFoundError):
    """A checkpoint was removed (pruned by its training) before or while it was read."""


@contextlib.contextmanager
def reading(ckpt: Path) -> Iterator[Path]:
    """Hold a shared flock on a checkpoint's marker while reading it (export, evaluation):
    pruning skips a checkpoint that is being read (:func:`delete_unless_read`)."""
    try:
        fd = os.open(Path(ckpt) / MARKER, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointGone(pruned_message(ckpt)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not (Path(ckpt) / MARKER).is_file():  # deleted between the open and the lock
            raise CheckpointGone(pruned_message(ckpt))
        yield Path(ckpt)
    finally:
        os.close(fd)


def pruned_message(ckpt: Path) -> str:
    return (f"{ckpt} was pruned (checkpoint.keep_last) by the training that owns the run "
            "while it was being read; export a newer --step")


def delete_unless_read(ckpt: Path) -> bool:
    """Delete a checkpoint unless a reader holds it (:func:`reading`); True if deleted."""
    try:
        fd = os.open(ckpt / MARKER, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        # The marker goes first, so a reader that opens it later sees the checkpoint gone.
        (ckpt / MARKER).unlink(missing_ok=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        return True
    finally:
        os.close(fd)
