"""Sharded fp32 EMA of the master weights.

No rank holds a full EMA copy. Each rank keeps the EMA of exactly the fp32 master values its
optimizer owns (a *fragment*: a contiguous range of one parameter's flattened elements):

* ZeRO-3: the rank's partition of every parameter (``safe_get_local_fp32_param``).
* ZeRO-1/2 and DeepSpeed's bf16 optimizer: the rank's contiguous slice of the flattened
  parameter groups, which DeepSpeed exposes per parameter as ``param._hp_mapping``.
* Anything else (ZeRO-0 in fp32, no optimizer sharding): an equal contiguous slice of the
  concatenation of all parameters, in ``named_parameters`` order.

Each fragment is saved with its parameter name, full shape and element offset, so a saved
EMA can be reassembled (:func:`scaletrain.export.consolidate.consolidate_ema_shards`) or
re-sliced for another world size or ZeRO stage (:meth:`ShardedEMA.load_shards`) without
knowing how it was written.

Decay schedules (beta = weight kept of the old average):
  constant  beta = decay
  warmup    beta = min(decay, (1 + n) / (10 + n))  (n = updates so far; the "EMA warm-up"
            used by Keras/TF ExponentialMovingAverage with num_updates)
  power     beta = (1 - batch/samples)^(gamma + 1)  (Karras et al. 2024, "Analyzing and
            Improving the Training Dynamics of Diffusion Models", eq. 2 with t counted in
            samples as in their code); gamma from sigma_rel via
            sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))  (their eq. 3).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from scaletrain.core.dist_env import import_deepspeed
from scaletrain.export.consolidate import EMA_FORMAT, load_ema_shard
from scaletrain.train.config import EMAConfig

import_deepspeed()
from deepspeed.utils import safe_get_local_fp32_param  # noqa: E402


def power_function_gamma(sigma_rel: float) -> float:
    """Solve EDM2 eq. 3 for gamma: gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0.

    Multiplying eq. 3 out: (gamma+2)^2 (gamma+3) = gamma^3 + 7 gamma^2 + 16 gamma + 12, so
    sigma_rel^2 (that) = gamma + 1 gives the cubic; its largest real root is the answer.
    """
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def ema_beta(cfg: EMAConfig, updates_done: int, samples_after: int, batch_samples: int) -> float:
    """The decay for the update that brings the count of updates to ``updates_done + 1``."""
    if cfg.schedule == "constant":
        return cfg.decay
    if cfg.schedule == "warmup":
        n = updates_done
        return min(cfg.decay, (1.0 + n) / (10.0 + n))
    gamma = power_function_gamma(cfg.sigma_rel)
    return max(0.0, 1.0 - batch_samples / max(samples_after, 1)) ** (gamma + 1.0)


@dataclass
class Fragment:
    """A contiguous range of one parameter's flattened elements, and where to read it."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    source: Callable[[], torch.Tensor]  # current fp32 master values, 1-D, length numel


def master_weight_fragments(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], rank: int, world_size: int
) -> list[Fragment]:
    """The fragments of fp32 master weights this rank's optimizer owns (see module doc)."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in params):
        return _zero3_fragments(params, rank)
    if any(getattr(p, "_hp_mapping", None) is not None for _, p in params):
        return _hp_mapping_fragments(params)
    return _equal_slice_fragments(params, rank, world_size)


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _zero3_fragments(params, rank: int) -> list[Fragment]:
    out = []
    for name, p in params:
        part = p.ds_tensor.ds_numel  # every rank's partition has this size (last one padded)
        offset = rank * part
        numel = max(0, min(part, p.ds_numel - offset))
        if numel == 0:
            continue
        out.append(
            Fragment(
                name, tuple(p.ds_shape), offset, numel,
                lambda p=p, numel=numel: safe_get_local_fp32_param(p).view(-1)[:numel],
            )
        )
    return out


def _hp_mapping_fragments(params) -> list[Fragment]:
    out = []
    for name, p in params:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            continue  # no element of this parameter lies in this rank's partition
        address = mapping.lp_fragment_address
        # Read the attribute on every call: loading a checkpoint re-links the mappings.
        out.append(
            Fragment(
                name, tuple(p.shape), address.start, address.numel,
                lambda p=p: p._hp_mapping.hp_fragment.view(-1),
            )
        )
    return out


def _equal_slice_fragments(params, rank: int, world_size: int) -> list[Fragment]:
    total = sum(p.numel() for _, p in params)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    out, start = [], 0
    for name, p in params:
        end = start + p.numel()
        a, b = max(lo, start), min(hi, end)
        if a < b:
            out.append(
                Fragment(
                    name, tuple(p.shape), a - start, b - a,
                    lambda p=p, a=a - start, b=b - start: p.data.view(-1)[a:b],
                )
            )
        start = end
    return out


class ShardedEMA:
    """fp32 EMA of this rank's fragments of the master weights."""

    def __init__(self, cfg: EMAConfig, fragments: list[Fragment]) -> None:
        self.cfg = cfg
        self.fragments = fragments
        self.shadow = [f.source().detach().to(torch.float32).clone() for f in fragments]
        self.updates = 0

    @torch.no_grad()
    def reset(self) -> None:
        """Start afresh from the current master weights (after they were initialised from
        released weights): the average of nothing but the starting point."""
        for shadow, fragment in zip(self.shadow, self.fragments):
            shadow.copy_(fragment.source())  # in place: no second EMA-sized allocation
        self.updates = 0

    @torch.no_grad()
    def update(self, samples_after: int, batch_samples: int) -> float:
        """Blend in the current master weights; call after every applied optimizer step."""
        beta = ema_beta(self.cfg, self.updates, samples_after, batch_samples)
        if self.shadow:
            current = [f.source().to(torch.float32) for f in self.fragments]
            # lerp: shadow + (1 - beta) (current - shadow) = beta shadow + (1 - beta) current
            torch._foreach_lerp_(self.shadow, current, 1.0 - beta)
        self.updates += 1
        return beta

    @contextmanager
    def swapped_into(self, module: torch.nn.Module):
        """Temporarily put the EMA weights into ``module``'s working weights (e.g. to sample
        validation images), restoring the trained weights on exit. A collective: every rank
        must enter it.

        ZeRO-3: each rank writes its EMA fragments into its own partitions (``ds_tensor``)
        and DeepSpeed gathers them in the forward as usual. Replicated weights (ZeRO-0/1/2):
        every element is owned by exactly one rank, so each parameter is assembled by a
        sum all-reduce of the ranks' fragments over zeros (exact: x + 0 = x); this briefly
        holds one working-dtype copy of the weights, as the replicated model itself does.
        """
        params = dict(module.named_parameters())
        backups: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            if any(_is_partitioned(p) for p in params.values()):
                for f, shadow in zip(self.fragments, self.shadow):
                    local = params[f.name].ds_tensor.data.view(-1)[: f.numel]
                    backups.append((local, local.clone()))
                    local.copy_(shadow)
            else:
                owned: dict[str, list[int]] = {}
                for i, f in enumerate(self.fragments):
                    owned.setdefault(f.name, []).append(i)
                distributed = dist.is_available() and dist.is_initialized()
                for name, p in params.items():
                    if not p.requires_grad:
                        continue
                    full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                    for i in owned.get(name, []):
                        f = self.fragments[i]
                        full[f.offset:f.offset + f.numel] = self.shadow[i]
                    if distributed:
                        dist.all_reduce(full, op=dist.ReduceOp.SUM)
                    backups.append((p.data, p.data.clone()))
                    p.data.copy_(full.view_as(p))
        try:
            yield module
        finally:
            with torch.no_grad():
                for target, saved in backups:
                    target.copy_(saved)

    def state_dict(self) -> dict:
        return {
            "format": EMA_FORMAT,
            "updates": self.updates,
            "fragments": [
                {"name": f.name, "shape": list(f.shape), "offset": f.offset, "numel": f.numel}
                for f in self.fragments
            ],
            "tensors": [t.clone() for t in self.shadow],
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a state written by a rank with the same fragments (same world and stage)."""
        self.load_shards([state])

    @torch.no_grad()
    def load_shards(self, states: Iterable[dict | str | Path]) -> None:
        """Fill this rank's fragments from saved shards of any layout (any world size/stage).

        Shards are read one at a time (memory-mapped when given as paths) and only the
        overlapping element ranges are copied, so no rank materialises the full EMA.
        """
        covered = [torch.zeros(f.numel, dtype=torch.bool) for f in self.fragments]
        by_name: dict[str, list[int]] = {}
        for i, f in enumerate(self.fragments):
            by_name.setdefault(f.name, []).append(i)
        updates = None
        for item in states:
            state = load_ema_shard(item) if isinstance(item, (str, Path)) else item
            if state.get("format") != EMA_FORMAT:
                raise ValueError(f"EMA state: not a {EMA_FORMAT} shard")
            updates = state["updates"] if updates is None else updates
            for meta, tensor in zip(state["fragments"], state["tensors"]):
                s0, s1 = meta["offset"], meta["offset"] + meta["numel"]
                for i in by_name.get(meta["name"], []):
                    f = self.fragments[i]
                    if list(f.shape) != list(meta["shape"]):
                        raise ValueError(
                            f"EMA shard: parameter {f.name} has shape {list(meta['shape'])} "
                            f"in the checkpoint but {list(f.shape)} in the model"
                        )
                    a, b = max(s0, f.offset), min(s1, f.offset + f.numel)
                    if a < b:
                        self.shadow[i][a - f.offset:b - f.offset].copy_(tensor[a - s0:b - s0])
                        covered[i][a - f.offset:b - f.offset] = True
        missing = [f.name for f, c in zip(self.fragments, covered) if not bool(c.all())]
        if missing:
            raise ValueError(f"EMA shards do not cover parameters: {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
        self.updates = int(updates or 0)
