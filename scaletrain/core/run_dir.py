"""What a run directory holds and where: the layout that training writes and everything else
(export, evaluation, the SLURM records, a resumed run) reads.

    RUN_DIR/config.yaml                 the resolved config of the run
    RUN_DIR/metrics.jsonl               metrics, one JSON line per logged step
    RUN_DIR/eval/                       evaluation's cache (FID reference statistics)
    RUN_DIR/checkpoints/step_{N:09d}/   one complete checkpoint (see scaletrain.train.checkpoint)
    RUN_DIR/checkpoints/latest          the name of the newest complete checkpoint
    RUN_DIR/slurm/                      SLURM job records and logs (scaletrain.launch.records)
    RUN_DIR/heartbeat/                  one file per live rank (scaletrain.core.heartbeat)

A checkpoint directory is complete once its ``COMPLETE`` marker is written (last, after every
other file). ``latest`` is a hint for people and tools; the scan of complete directories
decides, so a crash between the rename of a checkpoint and the rewrite of ``latest`` (or a
stale ``latest``) cannot lose a step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MARKER = "COMPLETE"
STATE = "state.json"
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
