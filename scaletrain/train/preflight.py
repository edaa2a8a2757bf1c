"""Checks of a run directory made before any process group, model or file is created.

They run in the launcher (or on every rank, each reaching the same verdict) so that a run that
would mix two trainings, or resume weights of another shape, stops in a second with one line
that names what is wrong, and nothing in the run directory has been touched yet.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from scaletrain.core.config_base import ConfigError, to_dict
from scaletrain.core.run_dir import CHECKPOINTS, STEP_PREFIX, find_latest, read_state
from scaletrain.data.loader.dataset_index import load_dataset_index
from scaletrain.data.loader.plan import num_slots

log = logging.getLogger(__name__)

# Model keys that do not change the weights a checkpoint holds: where they come from, which of
# them train, and recomputation. Every other model key must match the checkpoint's.
_RESUMABLE_MODEL_KEYS = frozenset({
    "init_from", "init_strict", "init_weights", "init_optimizer", "init_keep_step", "trainable",
    "init_record", "gradient_checkpointing", "text_seq_len",
})


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds any checkpoint directory (complete or not) of an earlier run."""
    root = Path(run_dir) / CHECKPOINTS
    return root.is_dir() and any(p.name.startswith(STEP_PREFIX) for p in root.iterdir())


def move_aside(run_dir: str | Path) -> Path:
    """Rename ``run_dir`` to ``RUN_DIR.old-YYYYmmdd-HHMMSS`` (never deleted); returns the new
    name."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while target.exists():  # two moves in one second
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    run_dir.rename(target)
    return target


def check_run_dir(cfg, run_dir: str | Path, overwrite: bool = False) -> Path | None:
    """Refuse a run directory that this run would mix with an earlier one.

    * ``checkpoint.resume=false`` where checkpoints exist: the new run's checkpoints, metrics
      and ``latest`` would interleave with the old run's (and pruning would delete the newer
      run's steps, which sort as older). ``overwrite`` moves the old run aside instead; the
      new name is returned.
    * resuming with a model config that differs from the checkpoint's: the differing keys are
      named in one error, before ``config.yaml`` is rewritten or any weight is loaded.
    """
    run_dir = Path(run_dir)
    if overwrite and run_dir.exists() and any(run_dir.iterdir()):
        moved = move_aside(run_dir)
        log.warning("--overwrite: moved the earlier run %s aside to %s", run_dir, moved)
        return moved
    if not cfg.checkpoint.resume and has_checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} holds checkpoints of an earlier run and checkpoint.resume=false would "
            f"mix the two runs: use another --run-dir, resume it (checkpoint.resume=true), or "
            f"pass --overwrite to move the earlier run aside (renamed, not deleted)"
        )
    if cfg.checkpoint.resume:
        check_same_model(cfg, run_dir)
    return None


def check_data(cfg, world_size: int | None = None) -> None:
    """Every data source has a readable dataset index, and training keeps shards to read:
    checked once, on rank 0 or in the launcher, before the process group and the model (a
    missing ``data.path`` used to fail after the whole start-up, once per rank).

    Fewer shards than reading slots (ranks x workers) is not refused: the loader deals an
    epoch's shards round-robin from an offset that moves every epoch, so every slot reads
    within a few epochs and each epoch's samples still come exactly once (only the epochs
    drift apart between slots; a small source of a mixture is the usual case). The loader
    warns about it on rank 0; ``world_size`` (given by ``--dry-run``, which builds no
    loader) says the same here. What starves is a source with no shard left to train on:
    an empty index (refused by :func:`load_dataset_index`) or ``eval.holdout_shards``
    holding out all of ``data.path``.
    """
    data = cfg.data
    if data.synthetic.enabled:
        return
    sources = [(data.path, "data.path")] if data.path else [
        (s.path, f"data.sources[{i}].path") for i, s in enumerate(data.sources)]
    for path, key in sources:
        try:
            index = load_dataset_index(path, data.storage, key=key)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        train_shards = index.num_shards
        if key == "data.path" and cfg.eval.holdout_shards:
            train_shards -= cfg.eval.holdout_shards
            if train_shards < 1:
                raise ConfigError(
                    f"eval.holdout_shards: {cfg.eval.holdout_shards} of the "
                    f"{index.num_shards} shards in {path} leaves none to train on; hold out "
                    f"fewer, or give the held-out set as eval.data")
        if world_size is not None:
            slots = num_slots(world_size, data.num_workers)
            if train_shards < slots:
                log.warning(
                    "%s: %d shards to train on for %d reading slots (%d ranks x %d workers): "
                    "some slots read none of it in an epoch, so its epochs drift apart "
                    "between slots (every sample still comes once per epoch); write smaller "
                    "shards or use fewer workers to keep them in step", path, train_shards,
                    slots, world_size, max(1, data.num_workers))
    if cfg.eval.data:
        try:
            load_dataset_index(cfg.eval.data, data.storage, key="eval.data")
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(str(exc)) from None


def saved_config(ckpt: Path) -> dict[str, Any] | None:
    path = ckpt / "config.yaml"
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def check_same_model(cfg, run_dir: Path) -> None:
    """A resume builds the model of ``cfg``; it must be the one the checkpoint holds."""
    ckpt = find_latest(run_dir)
    if ckpt is None:
        return
    saved = saved_config(ckpt)
    if saved is None or not isinstance(saved.get("model"), dict):
        return
    ours = to_dict(cfg.model)
    theirs = saved["model"]
    differing = sorted(
        key for key in set(ours) | set(theirs)
        if key not in _RESUMABLE_MODEL_KEYS and ours.get(key) != theirs.get(key)
    )
    if differing:
        details = ", ".join(
            f"model.{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in differing)
        raise ConfigError(
            f"{ckpt} was trained with another model config ({details}); resume with the "
            f"run's own config ({run_dir / 'config.yaml'}) or start a new --run-dir"
        )


def _global_batch(cfg, world_size: int) -> int:
    return cfg.data.batch_size * cfg.train.grad_accum * world_size


def _checkpoint_batch(cfg, ckpt: Path, state: dict[str, Any]) -> tuple[int | None, int | None]:
    """(world size, global batch) of the job that wrote ``ckpt`` (None when not recorded)."""
    old_world = state.get("world_size")
    if old_world is None:
        return None, None
    saved = saved_config(ckpt) or {}
    data, train = saved.get("data", {}), saved.get("train", {})
    per_rank = data.get("batch_size", cfg.data.batch_size) * train.get(
        "grad_accum", cfg.train.grad_accum)
    return old_world, per_rank * old_world


def lr_batch(cfg, run_dir: Path, world_size: int) -> int:
    """The global batch ``train.lr`` is meant for: the one the run started with. A fresh
    run's own; on a resume, what the checkpoint's state.json records (``lr_batch``), or for
    a checkpoint written before that was recorded, its own global batch."""
    ckpt = find_latest(run_dir) if cfg.checkpoint.resume else None
    if ckpt is None:
        return _global_batch(cfg, world_size)
    state = read_state(ckpt)
    if state.get("lr_batch"):
        return int(state["lr_batch"])
    return _checkpoint_batch(cfg, ckpt, state)[1] or _global_batch(cfg, world_size)


def train_config_in_use(cfg, world_size: int, reference_batch: int):
    """``cfg.train`` with the learning rates this job uses: with
    ``train.scale_lr_with_batch``, ``lr`` and ``min_lr`` scaled linearly by the global batch
    over ``reference_batch`` (:func:`lr_batch`); else ``cfg.train`` itself."""
    train = cfg.train
    if not train.scale_lr_with_batch:
        return train
    factor = _global_batch(cfg, world_size) / reference_batch
    return dataclasses.replace(train, lr=train.lr * factor, min_lr=train.min_lr * factor)


def describe_world_change(cfg, run_dir: Path, world_size: int, lr: float,
                          reference_batch: int | None = None) -> str | None:
    """One line when a resume changes the global batch (another number of ranks), else None;
    it says the learning rate ``lr`` this job uses, and whether it was scaled."""
    ckpt = find_latest(run_dir)
    if ckpt is None or not cfg.checkpoint.resume:
        return None
    old_world, old_global = _checkpoint_batch(cfg, ckpt, read_state(ckpt))
    if old_world is None or old_world == world_size:
        return None
    new_global = _global_batch(cfg, world_size)
    if cfg.train.scale_lr_with_batch:
        how = (f"learning rate {lr:g} (train.lr {cfg.train.lr:g} x {new_global}/"
               f"{reference_batch or old_global}: train.scale_lr_with_batch)")
    else:
        how = (f"learning rate {lr:g} unchanged (scale train.lr yourself, or set "
               f"train.scale_lr_with_batch=true, if the batch change should change it)")
    return (f"resuming at world size {world_size} (was {old_world}): global batch "
            f"{old_global} -> {new_global}, {how}")
