"""Resume checkpoints: atomic, self-describing, loadable at another world size.

Layout of one checkpoint (``run_dir/checkpoints/step_{N:09d}/``)::

    ds/                      DeepSpeed save_checkpoint: model states + ZeRO optimizer shards
    universal/               (only after a resume at another world size)
                             the same state as a DeepSpeed universal checkpoint
    ema/rank_{r:05d}.pt      EMA fragments of rank r (name, shape, offset + fp32 values)
    data/rank_{r:05d}.pt     data-loader state of rank r
    rng/rank_{r:05d}.pt      torch / numpy / python RNG states of rank r
    state.json               step, samples_seen, world_size, zero_stage, skipped steps, ...
    config.yaml              the resolved config of the run that wrote it
    COMPLETE                 the completion marker, written last

It is written under ``.tmp_step_{N:09d}``; once every rank has written its part, rank 0
writes the marker and renames the directory, then rewrites ``checkpoints/latest`` (a file
naming the newest complete directory). A directory without its marker (a crash mid-write)
is never loaded. Only the newest ``keep_last`` complete checkpoints are kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MARKER = "COMPLETE"
STATE = "state.json"
DS_TAG = "ds"
UNIVERSAL_TAG = "universal"
TMP_PREFIX = ".tmp_"


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def rank_file(kind: str, rank: int) -> str:
    return f"{kind}/rank_{rank:05d}.pt"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / STATE).is_file()


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.glob("step_*"):
        suffix = path.name[len("step_"):]
        if path.is_dir() and suffix.isdigit() and is_complete(path):
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    ``latest`` is a hint for people and tools; the scan decides, so a crash between the
    rename and the rewrite of ``latest`` (or a stale ``latest``) cannot lose a step.
    """
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
    return json.loads((ckpt / STATE).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- save


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    engine,
    ema,
    loader_state: Any,
    state: dict[str, Any],
    config_yaml: str,
    rank: int,
    keep_last: int,
) -> Path:
    """Write one checkpoint from every rank (a collective: all ranks must call it)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(step)
    tmp = root / (TMP_PREFIX + final.name)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier attempt
        for sub in ("ema", "data", "rng"):
            (tmp / sub).mkdir(parents=True)
    _barrier()
    # The universal-checkpoint info lets deepspeed.checkpoint.ds_to_universal convert
    # this checkpoint when the run resumes on a different number of ranks.
    engine.save_checkpoint(
        str(tmp), tag=DS_TAG, save_latest=False,
        client_state={UNIVERSAL_CHECKPOINT_INFO: {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}},
    )
    if ema is not None:
        torch.save(ema.state_dict(), tmp / rank_file("ema", rank))
    torch.save(loader_state, tmp / rank_file("data", rank))
    torch.save(rng_state(), tmp / rank_file("rng", rank))
    _barrier()
    if rank == 0:
        _write_text_atomic(tmp / "config.yaml", config_yaml)
        _write_text_atomic(tmp / STATE, json.dumps(state, indent=1, sort_keys=True))
        _write_text_atomic(tmp / MARKER, f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _write_text_atomic(root / LATEST, final.name + "\n")
        prune(run_dir, keep_last)
        log.info("checkpoint saved: %s", final)
    _barrier()
    return final


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and stale temp dirs."""
    done = complete_checkpoints(run_dir)
    for path in done[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    newest = int(done[-1].name[len("step_"):]) if done else -1
    for path in checkpoints_dir(run_dir).glob(TMP_PREFIX + "step_*"):
        suffix = path.name[len(TMP_PREFIX + "step_"):]
        if suffix.isdigit() and int(suffix) <= newest:
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- load


def check_resumable(ckpt: Path, saved: dict[str, Any], zero_stage: int) -> None:
    """A checkpoint resumes at any world size, but only under the ZeRO stage that wrote it:
    DeepSpeed's universal checkpoints re-shard across ranks, not across stages."""
    from scaletrain.config_base import ConfigError

    if saved["zero_stage"] != zero_stage:
        raise ConfigError(
            f"train.zero_stage: {ckpt} was written with ZeRO-{saved['zero_stage']}; resuming "
            f"with ZeRO-{zero_stage} is not supported. Keep train.zero_stage="
            f"{saved['zero_stage']}, or start a new --run-dir (initialise from an export)."
        )


def needs_universal(saved: dict[str, Any], world_size: int) -> bool:
    """DeepSpeed's own format only loads at the world size that wrote it."""
    return saved["world_size"] != world_size


def ensure_universal(ckpt: Path) -> Path:
    """Convert ``ckpt/ds`` into ``ckpt/universal`` once (rank 0 only; idempotent)."""
    out = ckpt / UNIVERSAL_TAG
    if (out / "zero").is_dir():
        return out
    from deepspeed.checkpoint import ds_to_universal

    tmp = ckpt / (TMP_PREFIX + UNIVERSAL_TAG)
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a DeepSpeed universal checkpoint (world size changed)", ckpt)
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(ckpt / DS_TAG), output_folder=str(tmp), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
    ))
    tmp.rename(out)
    return out


def load_engine_state(engine, ckpt: Path, universal: bool) -> None:
    """Model weights, fp32 master weights and optimizer state into a built engine."""
    tag = UNIVERSAL_TAG if universal else DS_TAG
    path, _ = engine.load_checkpoint(
        str(ckpt), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False,
        load_module_strict=True,
    )
    if path is None:
        raise RuntimeError(f"{ckpt / tag}: DeepSpeed could not load this checkpoint")


def rank_files(ckpt: Path, kind: str) -> list[Path]:
    files = sorted((ckpt / kind).glob("rank_*.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt / kind}: no per-rank files")
    return files


def load_rank_file(ckpt: Path, kind: str, rank: int) -> Any:
    path = ckpt / rank_file(kind, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (checkpoint written by fewer ranks?)")
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- export


def consolidate_ema(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 EMA weights ``{param name: tensor}`` on CPU, from any world size and stage.

    ``checkpoint_dir`` is a ``step_*`` directory or a run directory (newest checkpoint).
    """
    from scaletrain.train.ema import consolidate_ema_shards

    ckpt = resolve_checkpoint(checkpoint_dir)
    if not (ckpt / "ema").is_dir():
        raise FileNotFoundError(f"{ckpt}: this checkpoint has no EMA (ema.enabled was false)")
    return consolidate_ema_shards(rank_files(ckpt, "ema"))


def consolidate_model(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 raw (non-EMA) weights ``{param name: tensor}`` on CPU, any stage/world.

    Built from the fp32 master weights in the ZeRO optimizer shards (DeepSpeed's
    zero_to_fp32); without ZeRO shards, from the saved module state.
    """
    ckpt = resolve_checkpoint(checkpoint_dir)
    ds_dir = ckpt / DS_TAG
    if any(ds_dir.glob("*zero_pp_rank_*optim_states.pt")):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
        return {k: v.float().contiguous() for k, v in state.items()}
    model_files = sorted(ds_dir.glob("*model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"{ds_dir}: no DeepSpeed model states")
    module = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float().contiguous() for k, v in module.items()}
