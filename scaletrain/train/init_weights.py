"""Start a new run from released weights: ``model.init_from`` (and its companion keys).

The Trainer calls :func:`open_init_source` before it builds the engine (so a source that does
not fit stops the run in seconds, before any memory is spent) and :func:`start_weights` once
the engine, the EMA and the checkpoint manager exist and ``restore()`` has said whether the
run resumes. A resumed run ignores ``init_from`` (its own checkpoint is newer) and says so.

Writing the weights into the engine (:func:`load_weights`): every rank writes, parameter by
parameter, the working weights it holds and the fp32 master weights its optimizer owns, read
straight from the source in fp32. DeepSpeed builds its fp32 masters from the (bf16) module,
which would round an fp32 source through bf16; writing the masters ourselves keeps them bit
for bit the source's values, and the EMA then starts from them.

* ZeRO-3: a rank reads only the rows of each parameter that cover its partition (and the
  whole of the few small parameters ZeRO-3 keeps unpartitioned), so no rank ever holds more
  than one parameter of the model in full.
* ZeRO-0/1/2: every rank holds the whole working model anyway; tensors are read one at a
  time from the memory-mapped file, and each rank's master fragment is a slice of them.

From a scaletrain run or checkpoint, ``init_optimizer`` also carries the Adam moments and
step count (and the EMA) over, at any world size and ZeRO stage: the checkpoint is converted
to DeepSpeed's universal form (one folder per parameter) inside the new run directory, which
every stage's optimizer loads, and the EMA shards are re-sliced. The data position always
starts afresh; the step count too, unless ``init_keep_step``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from scaletrain.core.dist_env import import_deepspeed
from scaletrain.core.files import atomic_output, sha256_file
from scaletrain.core.run_dir import CONFIG, find_latest, rank_files
from scaletrain.export.consolidate import DS_TAG, convert_to_universal
from scaletrain.export.sources import (
    CHECKPOINT,
    InitSourceError,
    WeightSource,
    open_weight_source,
)

deepspeed = import_deepspeed()
from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT  # noqa: E402
from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param  # noqa: E402

deepspeed_version = deepspeed.__version__

log = logging.getLogger(__name__)

INIT_DIR = "init"  # RUN_DIR/init/: scratch space of the initialisation (removed after it)


def open_init_source(model_cfg, run_dir: str | Path, resume: bool) -> WeightSource | None:
    """``model.init_from`` opened and checked against the model, or None when there is nothing
    to initialise: no ``init_from``, or the run will resume from its own checkpoint.

    Raises :class:`InitSourceError` (a ConfigError) when the source cannot be used; logs
    what a non-strict load will leave out.
    """
    if not model_cfg.init_from or (resume and find_latest(run_dir) is not None):
        return None
    source = open_weight_source(model_cfg)
    try:
        for warning in source.check(model_cfg.init_strict):
            log.warning("model.init_from: %s", warning)
    except InitSourceError:
        source.close()
        raise
    return source


def check_init_source(cfg, run_dir: str | Path) -> None:
    """Check ``model.init_from`` of a run config against its model (reads headers only):
    what a launcher does before it starts any rank. Raises InitSourceError."""
    source = open_init_source(cfg.model, run_dir, cfg.checkpoint.resume)
    if source is not None:
        source.close()


def start_weights(source: WeightSource | None, model_cfg, *, run_dir: Path, engine, ema,
                  state, resumed: Path | None, rank: int) -> dict[str, Any] | None:
    """Put the run's starting weights in place; return the record of where they came from
    (kept in config.yaml as ``model.init_record``). Collective: every rank calls it."""
    if resumed is not None:
        if model_cfg.init_from:
            log.info("model.init_from ignored: the run resumes from its own checkpoint %s",
                     resumed)
        if source is not None:
            source.close()
        return _saved_record(resumed)
    if source is None and model_cfg.init_from:  # a checkpoint vanished since the check
        source = open_init_source(model_cfg, run_dir, resume=False)
    if source is None:
        log.info("weights: random initialisation (model.init_from is not set)")
        return None
    try:
        return _initialise(source, model_cfg, run_dir, engine, ema, state, rank)
    finally:
        source.close()


def _initialise(source: WeightSource, model_cfg, run_dir: Path, engine, ema, state,
                rank: int) -> dict[str, Any]:
    if model_cfg.init_optimizer and not engine.zero_optimization():
        raise InitSourceError("model.init_optimizer: train.zero_stage=0 keeps its optimizer "
                              "state in a form DeepSpeed cannot load from another run; use "
                              "ZeRO-1, 2 or 3, or model.init_optimizer=false")
    start = time.monotonic()
    log.info("initialising from %s (%s, %s)", source.spec, source.kind, source.path)
    hashes = _hash_in_background(source.files) if rank == 0 else None
    scratch = None
    if source.kind == CHECKPOINT and source.reader.zero and (
            model_cfg.init_weights == "raw" or model_cfg.init_optimizer):
        scratch = _universal(source, run_dir, rank, engine.optimizer)
        if model_cfg.init_weights == "raw":
            source.reader.universal = scratch
    if model_cfg.init_optimizer:
        load_optimizer_state(engine, scratch, source)
    loaded = load_weights(engine, source, rank)
    ema_from = _start_ema(ema, source, model_cfg) if ema is not None else None
    if model_cfg.init_keep_step:
        state.step = int(source.details.get("step") or 0)
        state.samples_seen = int(source.details.get("samples_seen") or 0)
    dist.barrier()
    if scratch is not None and rank == 0:
        shutil.rmtree(scratch.parent, ignore_errors=True)  # RUN_DIR/init: made by _universal
    record = {
        "from": source.spec,
        "path": str(source.path.resolve()),
        "kind": source.kind,
        **{k: v for k, v in source.details.items() if k != "prefix"},
        "keys": source.counts(),
        "missing": source.missing[:20],
        "unexpected": source.unexpected[:20],
        "optimizer": bool(model_cfg.init_optimizer),
        "ema": ema_from,
        "start_step": state.step,
        "initialised_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if hashes is not None:
        record["files"] = [future.result() for future in hashes]
    log.info("initialised %d of %d parameter tensors from %s in %.1f s (optimizer state: %s, "
             "EMA: %s, step %d)", loaded, len(source.shapes), source.spec,
             time.monotonic() - start, "carried over" if model_cfg.init_optimizer else "fresh",
             ema_from or "off", state.step)
    return record


# ----------------------------------------------------------------------------- weights


@torch.no_grad()
def load_weights(engine, source: WeightSource, rank: int) -> int:
    """Write the source's values into this rank's working weights and fp32 master weights,
    one parameter at a time; parameters the source lacks keep their init. Returns how many
    parameter tensors were written."""
    loaded = 0
    unfused = _unfused_masters(engine.optimizer)
    for name, param in engine.module.named_parameters():
        if name not in source.key_map:
            continue
        if hasattr(param, "ds_id"):
            _load_partitioned(param, name, source, rank)
        else:
            value = source.read(name)
            param.data.copy_(value)  # the working copy: rounds to bf16 once, as DeepSpeed does
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:  # this rank's fragment of the fp32 master, exactly
                a = mapping.lp_fragment_address
                mapping.hp_fragment.data.copy_(value.reshape(-1)[a.start:a.start + a.numel])
            elif id(param) in unfused:  # ZeRO-0: a whole fp32 copy per parameter
                unfused[id(param)].data.copy_(value.reshape(param.shape))
        loaded += 1
    return loaded


def _unfused_masters(optimizer) -> dict[int, torch.Tensor]:
    """ZeRO-0 in bf16: DeepSpeed's unfused optimizer keeps one fp32 master per parameter
    (``fp32_groups``, paired with ``fp16_groups``); the ZeRO stages have none of these."""
    pairs = zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", []))
    return {id(lp): hp for lps, hps in pairs for lp, hp in zip(lps, hps)
            if not hasattr(lp, "_hp_mapping")}


def _load_partitioned(param, name: str, source: WeightSource, rank: int) -> None:
    """ZeRO-3: this rank's partition (a contiguous range of the flattened parameter) from
    only the source rows that cover it."""
    numel, part = param.ds_numel, param.ds_tensor.ds_numel
    offset = rank * part
    count = max(0, min(part, numel - offset))
    shape = tuple(param.ds_shape)
    if count:
        row = numel // shape[0] if shape else 1
        first, last = offset // row, math.ceil((offset + count) / row)
        rows = source.read(name, first, last).reshape(-1) if shape else source.read(name)
        values = rows.reshape(-1)[offset - first * row:offset - first * row + count]
        param.ds_tensor.data.reshape(-1)[:count].copy_(values)
        if param.requires_grad:
            master = safe_get_local_fp32_param(param).clone()
            master.reshape(-1)[:count].copy_(values)
            safe_set_local_fp32_param(param, master)
    if param.data.numel() == numel:  # a small parameter ZeRO-3 keeps whole on every rank
        param.data.copy_(source.read(name).reshape(param.data.shape))


def _start_ema(ema, source: WeightSource, model_cfg) -> str:
    """The EMA starts equal to the master weights just written, or, with init_optimizer,
    continues the source run's own EMA."""
    if model_cfg.init_optimizer and source.checkpoint is not None and (
            source.checkpoint / "ema").is_dir():
        try:
            ema.load_shards(rank_files(source.checkpoint, "ema"))
        except ValueError as exc:
            raise InitSourceError(f"model.init_optimizer: the EMA of {source.checkpoint} "
                                  f"does not cover this model's trainable parameters ({exc})"
                                  ) from None
        return f"continued ({ema.updates} updates)"
    ema.reset()
    return "restarted from the initial weights"


# ----------------------------------------------------------------------------- optimizer


def _universal(source: WeightSource, run_dir: Path, rank: int, optimizer) -> Path:
    """The source checkpoint in DeepSpeed's universal form, written by rank 0 inside this
    run's directory (the source is never written to)."""
    ckpt = source.checkpoint
    tag = hashlib.sha256(str(ckpt.resolve()).encode()).hexdigest()[:10]
    out = Path(run_dir) / INIT_DIR / f"universal-{ckpt.name}-{tag}"
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        log.info("converting %s to DeepSpeed's universal form in %s", ckpt, out)
        convert_to_universal(ckpt / DS_TAG, out)
        _loadable_by_any_stage(out, optimizer, source.reader.shapes)
    dist.barrier()
    return out


def _loadable_by_any_stage(universal: Path, optimizer, shapes: dict[str, tuple[int, ...]]
                           ) -> None:
    """Make a universal checkpoint loadable by every ZeRO stage, not only the one that wrote
    it (the copy is this run's scratch).

    DeepSpeed writes it in the form of the stage that saved it, and each stage's loader
    reads its own: ZeRO-1/2 (and the bf16 optimizer) want every tensor file as
    ``{"param": tensor}`` and a ``step.pt`` in each parameter's folder, plus
    ``param_groups`` and ``ds_version`` in ``zero/optimizer_state.pt``; ZeRO-3 writes bare
    flat tensors and keeps the step in that file's ``optimizer_state_dict`` (it reads both
    tensor forms). Both forms are written here, with this run's own hyperparameters."""
    zero = universal / "zero"
    folders = [p for p in zero.iterdir() if p.is_dir()]
    for folder in folders:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            path = folder / f"{key}.pt"
            value = torch.load(path, map_location="cpu", weights_only=False)
            if torch.is_tensor(value):  # ZeRO-3's flat form
                with atomic_output(path) as tmp:
                    torch.save({"param": value.reshape(shapes[folder.name]), "cat_dim": 0}, tmp)
    with_step = next((p / "step.pt" for p in folders if (p / "step.pt").is_file()), None)
    if with_step is not None:
        step = torch.load(with_step, weights_only=False)
    else:  # memory-mapped: ZeRO-3's file also holds rank 0's flat fp32 partition
        saved = torch.load(zero / "optimizer_state.pt", map_location="cpu", mmap=True,
                           weights_only=False)
        step = torch.as_tensor(saved[OPTIMIZER_STATE_DICT]["state"][0]["step"]).clone()
        del saved
    for folder in folders:
        if not (folder / "step.pt").is_file():
            torch.save(step, folder / "step.pt")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    with atomic_output(zero / "optimizer_state.pt") as tmp:
        torch.save({DS_VERSION: deepspeed_version, "param_groups": groups,
                    OPTIMIZER_STATE_DICT: {"state": {0: {"step": step}},
                                           "param_groups": groups}}, tmp)


def load_optimizer_state(engine, universal: Path, source: WeightSource) -> None:
    """Adam's moments and step count from a universal checkpoint into this engine's ZeRO
    optimizer (any stage and world size: each takes its own partition), keeping this run's
    hyperparameters (betas, eps, weight decay, clipping)."""
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    lacking = [n for n in names if not (universal / "zero" / n / "exp_avg.pt").is_file()]
    if lacking:
        raise InitSourceError(
            f"model.init_optimizer: {source.checkpoint} holds no optimizer state for "
            f"{len(lacking)} parameter(s) this run trains (frozen there?): "
            + ", ".join(lacking[:10]) + (" ..." if len(lacking) > 10 else ""))
    optimizer = engine.optimizer
    keep = [{k: v for k, v in group.items() if k != "params"} for group in
            optimizer.param_groups]
    clip = getattr(optimizer, "clip_grad", None)
    # DeepSpeed's own universal-checkpoint path (what engine.load_checkpoint calls), which
    # also loads the fp32 masters; the weights are written again after this.
    optimizer.load_state_dict(state_dict_list=None, checkpoint_folder=str(universal),
                              load_optimizer_states=True, load_from_fp32_weights=True)
    for group, saved in zip(optimizer.param_groups, keep):
        group.update(saved)
    if clip is not None:
        optimizer.clip_grad = clip
    if not engine.zero_optimization_partition_weights():
        optimizer.update_lp_params()


# ----------------------------------------------------------------------------- record


def _hash_in_background(files: list[Path]) -> list[Future]:
    """sha256 of every source file, computed while the weights load (rank 0 only)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="init-sha256")
    futures = [pool.submit(_describe_file, Path(f)) for f in files]
    pool.shutdown(wait=False)
    return futures


def _describe_file(path: Path) -> dict[str, Any]:
    return {"path": str(path.resolve()), "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def _saved_record(ckpt: Path) -> dict[str, Any] | None:
    """The init record a checkpoint's config carries (a resumed run keeps its origin)."""
    path = ckpt / CONFIG
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return (data.get("model") or {}).get("init_record")
