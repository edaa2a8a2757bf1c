"""A training checkpoint's shards -> full fp32 weights ``{name: tensor}`` on the CPU.

Works for any world size and ZeRO stage, with no GPU and no process group: the EMA from its
per-rank shards, the raw weights from the fp32 master weights in the ZeRO optimizer shards
(DeepSpeed's zero_to_fp32) or, without ZeRO shards, from the saved module state.

The EMA shard format (written by :class:`scaletrain.train.ema.ShardedEMA`): a dict with
``format`` = :data:`EMA_FORMAT`, ``updates``, ``fragments`` (name, full shape, element offset
and count of each contiguous piece of a flattened parameter) and ``tensors`` (fp32, 1-D).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from scaletrain.core.dist_env import import_deepspeed
from scaletrain.core.run_dir import rank_files, resolve_checkpoint

import_deepspeed()
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402

EMA_FORMAT = "scaletrain.sharded_ema.v1"
DS_TAG = "ds"  # DeepSpeed's own checkpoint inside a checkpoint directory


def load_ema_shard(path: str | Path) -> dict:
    """One EMA shard, memory-mapped, checked to be of our format."""
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if state.get("format") != EMA_FORMAT:
        raise ValueError(f"{path}: not a {EMA_FORMAT} shard")
    return state


def consolidate_ema_shards(paths: Iterable[str | Path]) -> dict[str, torch.Tensor]:
    """Assemble full fp32 tensors ``{name: tensor}`` from EMA shards of any layout (CPU)."""
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in paths:
        state = load_ema_shard(path)
        for meta, tensor in zip(state["fragments"], state["tensors"]):
            name, shape = meta["name"], tuple(meta["shape"])
            if name not in full:
                numel = int(np.prod(shape)) if shape else 1
                full[name] = torch.zeros(numel, dtype=torch.float32)
                covered[name] = torch.zeros(numel, dtype=torch.bool)
                shapes[name] = shape
            a = meta["offset"]
            full[name][a:a + meta["numel"]].copy_(tensor)
            covered[name][a:a + meta["numel"]] = True
    gaps = [n for n, c in covered.items() if not bool(c.all())]
    if gaps:
        raise ValueError(f"EMA shards leave parameters incomplete: {', '.join(gaps[:5])}")
    return {name: flat.view(shapes[name]) for name, flat in full.items()}


def consolidate_ema(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 EMA weights of a ``step_*`` directory or a run directory (newest checkpoint)."""
    ckpt = resolve_checkpoint(checkpoint_dir)
    if not (ckpt / "ema").is_dir():
        raise FileNotFoundError(f"{ckpt}: this checkpoint has no EMA (ema.enabled was false)")
    return consolidate_ema_shards(rank_files(ckpt, "ema"))


def consolidate_model(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 raw (non-EMA) weights of a ``step_*`` or run directory, any stage/world."""
    ckpt = resolve_checkpoint(checkpoint_dir)
    ds_dir = ckpt / DS_TAG
    if any(ds_dir.glob("*zero_pp_rank_*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
        return {k: v.float().contiguous() for k, v in state.items()}
    model_files = sorted(ds_dir.glob("*model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"{ds_dir}: no DeepSpeed model states")
    module = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float().contiguous() for k, v in module.items()}
