"""A training checkpoint's shards -> full fp32 weights ``{name: tensor}`` on the CPU.

Works for any world size and ZeRO stage, with no GPU and no process group: the EMA from its
per-rank shards, the raw weights from the fp32 master weights in the ZeRO optimizer shards
(DeepSpeed's zero_to_fp32) or, without ZeRO shards, from the saved module state.

The EMA shard format (written by :class:`scaletrain.train.ema.ShardedEMA`): a dict with
``format`` = :data:`EMA_FORMAT`, ``updates``, ``fragments`` (name, full shape, element offset
and count of each contiguous piece of a flattened parameter) and ``tensors`` (fp32, 1-D).
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from scaletrain.core.dist_env import import_deepspeed
from scaletrain.core.log import captured_output
from scaletrain.core.run_dir import TMP_PREFIX, rank_files, resolve_checkpoint

import_deepspeed()
from deepspeed.checkpoint import ds_to_universal  # noqa: E402
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
    """Full fp32 EMA weights of a ``step_*`` directory or a run directory (newest checkpoint).

    Parameters the run kept frozen (``model.trainable``) have no EMA; they are what training
    held, taken from the model states."""
    ckpt = resolve_checkpoint(checkpoint_dir)
    if not (ckpt / "ema").is_dir():
        raise FileNotFoundError(f"{ckpt}: this checkpoint has no EMA (ema.enabled was false)")
    weights = consolidate_ema_shards(rank_files(ckpt, "ema"))
    states = model_states(ckpt)
    for name in frozen_shapes(states):
        weights.setdefault(name, frozen_value(states, name))
    return weights


def model_states(ckpt: Path) -> list[dict]:
    """DeepSpeed's model-states files of a checkpoint (one, or one per rank under ZeRO-3),
    memory-mapped: a tensor is read when it is used."""
    files = sorted((ckpt / DS_TAG).glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt / DS_TAG}: no DeepSpeed model states")
    return [torch.load(f, map_location="cpu", mmap=True, weights_only=False) for f in files]


def frozen_shapes(states: list[dict]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the parameters the run kept frozen (no optimizer state, no EMA).

    DeepSpeed lists them under ZeRO-2/3; under ZeRO-0/1 they are the module's parameters
    that no optimizer group holds."""
    listed = states[0].get("frozen_param_shapes")
    if listed:
        return {k: tuple(v) for k, v in listed.items()}
    if states[0].get("param_shapes") is None:  # ZeRO-0: the module holds every parameter
        return {}
    trained = {name for group in states[0]["param_shapes"] for name in group}
    skip = trained | set(states[0].get("buffer_names") or [])
    return {k: tuple(v.shape) for k, v in (states[0].get("module") or {}).items()
            if k not in skip}


def frozen_value(states: list[dict], name: str) -> torch.Tensor:
    """A frozen parameter in fp32, as training held it: ZeRO-3 saves each rank's partition
    (the concatenation, cut to size, is the parameter), ZeRO-2 all of it, ZeRO-0/1 only the
    module's copy."""
    shape = frozen_shapes(states)[name]
    if not states[0].get("frozen_param_fragments"):
        return states[0]["module"][name].float().reshape(shape)
    flat = torch.cat([s["frozen_param_fragments"][name].reshape(-1) for s in states])
    return flat[: int(torch.Size(shape).numel())].float().reshape(shape)


def consolidate_model(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 raw (non-EMA) weights of a ``step_*`` or run directory, any stage/world."""
    ckpt = resolve_checkpoint(checkpoint_dir)
    ds_dir = ckpt / DS_TAG
    if any(ds_dir.glob("*zero_pp_rank_*optim_states.pt")):
        with captured_output("DeepSpeed's ZeRO consolidation"):  # its prints and bars
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
        weights = {k: v.float().contiguous() for k, v in state.items()}
        states = model_states(ckpt)  # ZeRO-0/1 leave frozen parameters out of the above
        for name in frozen_shapes(states):
            weights.setdefault(name, frozen_value(states, name))
        return weights
    model_files = sorted(ds_dir.glob("*model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"{ds_dir}: no DeepSpeed model states")
    module = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float().contiguous() for k, v in module.items()}


def convert_to_universal(ds_dir: Path, out: Path) -> Path:
    """DeepSpeed's checkpoint in ``ds_dir`` as a universal checkpoint in ``out``: one folder per
    parameter (``zero/NAME/{fp32,exp_avg,exp_avg_sq,step}.pt``, full unpartitioned tensors)
    that any world size and ZeRO stage can load. Idempotent; written under a temporary name
    and renamed, so a crash never leaves a half conversion that looks complete."""
    if (out / "zero").is_dir():
        return out
    tmp = out.with_name(TMP_PREFIX + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    with captured_output("DeepSpeed's universal conversion"):  # its prints and bars
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(ds_dir), output_folder=str(tmp), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
        ))
    tmp.rename(out)
    return out
