"""Resume checkpoints: one owner for saving and restoring every piece of training state.

Layout of one checkpoint (``run_dir/checkpoints/step_{N:09d}/``)::

    ds/                      DeepSpeed save_checkpoint: model states + ZeRO optimizer shards
    universal/               (only after a resume at another world size)
                             the same state as a DeepSpeed universal checkpoint
    ema/rank_{r:05d}.pt      EMA fragments of rank r (name, shape, offset + fp32 values)
    data/rank_{r:05d}.pt     data-loader state of rank r
    rng/rank_{r:05d}.pt      torch / numpy / python RNG states of rank r
    state.json               step, samples_seen, world_size, zero_stage, skipped steps, ...
    config.yaml              the resolved config of the run that wrote it
    manifest.json            size and sha256 of every file above
    COMPLETE                 the completion marker, written last

It is written under ``.tmp_step_{N:09d}``; once every rank has written its part, the ranks
fsync and hash a round-robin share of the files each, rank 0 writes the manifest, fsyncs every
directory, writes the marker, renames the directory and fsyncs its parent, then rewrites
``checkpoints/latest`` (a file naming the newest complete directory). A directory without
its marker (a crash mid-write) is never loaded; after a power loss a directory with its
marker has all its bytes. Only the newest ``keep_last`` complete checkpoints are kept.

With ``checkpoint.async_save`` the same files are written in the background (torchtitan's
asynchronous mode is the model): ``save`` copies every tensor of this rank's checkpoint to
host memory (DeepSpeed's files through :class:`StagingEngine`, the per-rank objects' state
dicts, state.json and config.yaml) and returns; that copy is the training stall. A thread
per rank then writes, fsyncs and hashes its own files and leaves ``.parts/rank_{r:05d}.json``
(its hashes, or its error); rank 0's thread waits for every part, hashes the files nobody
claimed, removes ``.parts`` and finishes as above (manifest, fsync, COMPLETE, rename,
``latest``, prune). The threads run no collectives (gloo collectives from two threads of a
process would interleave); :meth:`CheckpointManager.wait` is the collective that agrees on
the outcome, called before the next save and when training stops. DeepSpeed's own
``DecoupledCheckpointEngine`` (deepspeed/runtime/checkpoint_engine/
decoupled_checkpoint_engine.py) is not asynchronous for this purpose: it hands the live
tensors to a subprocess and ``engine.step()`` blocks in its ``commit()`` until every file is
written (the optimizer step would otherwise change the tensors being written), and its fast
writer needs libaio.

``restore`` verifies the newest complete checkpoint against its manifest (each rank reads
its share); a damaged one is named in one line, renamed to ``step_N.corrupt`` (never
deleted) and the next older one is tried.

:class:`CheckpointManager` holds the engine (model + optimizer, saved by DeepSpeed), the
train state (``state.json``) and a dict of per-rank stateful objects (EMA, loader, RNG),
and has one ``save(step)`` and one ``restore()``. A resume at another world size is handled
inside ``restore``: DeepSpeed's checkpoint is converted to a universal one, the EMA shards
are re-sliced, the loader states merged; RNG states are per rank and start afresh
(torchtitan's ``CheckpointManager`` and edm2's ``CheckpointIO`` are the models).
"""

from __future__ import annotations

import copy
import errno
import functools
import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from scaletrain.core.config_base import ConfigError
from scaletrain.core.dist_env import import_deepspeed
from scaletrain.core.files import atomic_write, atomic_write_json, fsync_dir
from scaletrain.core.run_dir import (
    LATEST,
    MANIFEST,
    MARKER,
    STATE,
    TMP_PREFIX,
    checkpoint_files,
    checkpoint_step,
    checkpoints_dir,
    complete_checkpoints,
    delete_unless_read,
    find_latest,
    hash_files,
    newest_healthy,
    rank_file,
    rank_files,
    read_manifest,
    read_state,
    set_aside,
    share,
    step_dir_name,
    verify_files,
)
from scaletrain.data.loader import NeedsGlobalState, merge_states
from scaletrain.export.consolidate import DS_TAG, convert_to_universal
from scaletrain.train.config import CheckpointConfig

import_deepspeed()
from deepspeed.checkpoint.constants import (  # noqa: E402
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine  # noqa: E402

log = logging.getLogger(__name__)

UNIVERSAL_TAG = "universal"


@dataclass
class TrainState:
    """The loop's counters: what ``state.json`` records besides the run's shape."""

    step: int = 0  # optimizer steps taken
    samples_seen: int = 0
    skipped_steps: int = 0  # steps whose update was discarded (non-finite loss or gradients)
    # The global batch train.lr is meant for (the run's first job's; 0: not recorded), for
    # train.scale_lr_with_batch after resumes at other world sizes.
    lr_batch: int = 0


@dataclass
class PerRank:
    """A stateful object each rank saves to ``KIND/rank_{r:05d}.pt``.

    ``load_own`` takes this rank's own file when the world size is unchanged; ``load_all``
    takes every rank's file (paths) when it changed, or is None for state that does not
    carry over to another layout (it then keeps its fresh value)."""

    state_dict: Callable[[], Any]
    load_own: Callable[[Any], None]
    load_all: Callable[[list[Path]], None] | None = None


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


RNG = PerRank(rng_state, set_rng_state)


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def loader_state(loader) -> PerRank:
    """A training loader's position: at another world size, every rank's states merged."""
    return PerRank(loader.state_dict, loader.load_state_dict,
                   lambda paths: loader.load_state_dict(merge_states([_load(p) for p in paths])))


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def fsync_tree(root: Path) -> None:
    """fsync every directory under ``root`` (deepest first) and ``root`` itself, so that the
    entries of the files in them survive a power loss."""
    dirs = [Path(d) for d, _, _ in os.walk(root)]
    for d in reversed(dirs):
        fsync_dir(d)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); its partial copy is gone."""


def _is_disk_full(exc: BaseException, root: Path, needed: int) -> bool:
    """ENOSPC, or a C++ stream error (torch.save reports ENOSPC as "basic_ios::clear:
    iostream error" or "file write failed") while the file system has less room left than
    one more checkpoint."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(root).free < max(needed, 1)
    except OSError:
        return False


def checkpoint_bytes(ckpt: Path | None) -> int:
    """The size of a complete checkpoint by its manifest (0 without one)."""
    manifest = read_manifest(ckpt) if ckpt is not None else None
    return sum(int(f.get("size", 0)) for f in (manifest or {}).values())


PARTS = ".parts"  # under the temporary directory: each rank's result of a background write


def to_host(item: Any, reuse: Any = None) -> Any:
    """A copy of ``item`` that later training cannot change: every tensor copied to CPU
    (detached, same dtype and shape; into pinned memory from a GPU), containers rebuilt,
    other leaves deep-copied.

    ``reuse`` is the copy an earlier save made of the same file: its tensors are refilled in
    place where shape and dtype still match. Allocating (and page-faulting in) gigabytes of
    fresh host memory at every save cost more than the copy itself (torchtitan's async mode
    keeps its staging buffers for the same reason)."""
    if torch.is_tensor(item):
        src = item.detach()
        if not (torch.is_tensor(reuse) and reuse.shape == src.shape
                and reuse.dtype == src.dtype):
            reuse = torch.empty(src.shape, dtype=src.dtype, device="cpu",
                                pin_memory=src.is_cuda)
        # From pinned memory the device copy runs asynchronously; the caller synchronizes once.
        return reuse.copy_(src, non_blocking=src.is_cuda)
    if isinstance(item, dict):
        old = reuse if isinstance(reuse, dict) else {}
        return type(item)((k, to_host(v, old.get(k))) for k, v in item.items())
    if isinstance(item, (list, tuple)):
        old = (reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(item)
               else [None] * len(item))
        values = [to_host(v, o) for v, o in zip(item, old)]
        if isinstance(item, list):
            return values
        return type(item)(*values) if hasattr(item, "_fields") else type(item)(values)
    return copy.deepcopy(item)


class StagingEngine(CheckpointEngine):
    """Installed as ``engine.checkpoint_engine`` for one ``save_checkpoint`` call: hands
    each (state dict, path) DeepSpeed would write to ``staged``, which writes it at once
    through the engine it replaced or keeps a host copy to write later (see
    :meth:`Staged.put`)."""

    def __init__(self, inner: CheckpointEngine, staged: Staged) -> None:
        super().__init__()
        self.name = "StagingEngine"
        self.inner, self.staged = inner, staged

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        # Written later by the engine replaced here: its serialization settings hold.
        self.staged.put(Path(path), self.inner.save, state_dict)

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location=map_location)

    def commit(self, info) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        # True makes DeepSpeed clone tensors before save() (so a view does not write its
        # whole storage); to_host already gives each tensor its own compact storage.
        return self.staged.host_copies is None and self.inner.preserves_storage_sharing()


@dataclass
class Staged:
    """One rank's part of a checkpoint in ``tmp``: the files written, and those still to
    write (an asynchronous save's host copies, as ``(path, write)``).

    ``host_copies`` is None for a synchronous save: every file is written at once (no state
    dict outlives its file, so the save's peak memory is what writing it needs). For an
    asynchronous one it holds the copies of the previous save by file name under the
    checkpoint directory, refilled in place (:func:`to_host`)."""

    tmp: Path
    step: int
    host_copies: dict[str, Any] | None
    written: list[Path] = field(default_factory=list)
    pending: list[tuple[Path, Callable[[], None]]] = field(default_factory=list)

    def put(self, path: Path, write: Callable[[Any, Path], None], payload: Any) -> None:
        """``write(payload, path)`` now, or later from a host copy of ``payload``."""
        if self.host_copies is None:
            write(payload, path)
            self.written.append(path)
            return
        key = os.path.relpath(path, self.tmp)
        self.host_copies[key] = to_host(payload, self.host_copies.get(key))
        self.pending.append((path, functools.partial(write, self.host_copies[key], path)))

    def write(self) -> list[str]:
        """Write what is pending; every file's path relative to ``tmp``."""
        while self.pending:
            path, write = self.pending.pop(0)
            write()
            self.written.append(path)
        return [os.path.relpath(path, self.tmp) for path in self.written]


class _Background:
    """One asynchronous save in flight on this rank: the thread, its error, and (rank 0)
    whether it may stop waiting for the other ranks' parts."""

    def __init__(self, target: Callable[[], None], staged: Staged) -> None:
        self.staged = staged
        self.error: BaseException | None = None
        self.parts_written = threading.Event()  # this rank's part file (or its failure)
        self.cancel = threading.Event()  # another rank failed: rank 0 stops waiting
        self.thread = threading.Thread(target=target, name=f"checkpoint-{staged.step}",
                                       daemon=True)


class CheckpointManager:
    """Saves and restores the engine, the train state and the per-rank objects of one run.

    Every method is a collective: all ranks call it at the same point of the loop.
    """

    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path, *, rank: int,
                 world_size: int, zero_stage: int, engine, train_state: TrainState,
                 per_rank: dict[str, PerRank], run_info: Callable[[], dict[str, Any]],
                 config_yaml: str, wait_timeout_s: float = 600.0) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.root = checkpoints_dir(run_dir)
        self.rank, self.world_size, self.zero_stage = rank, world_size, zero_stage
        self.engine = engine
        self.train_state = train_state
        self.per_rank = per_rank
        self.run_info = run_info  # extra state.json fields (global batch, EMA updates, ...)
        self.config_yaml = config_yaml
        # How long rank 0's background thread waits for the other ranks' parts (the
        # process group's timeout: a collective would have waited as long).
        self.wait_timeout_s = wait_timeout_s
        self._pending: _Background | None = None  # the asynchronous save in flight
        # async_save: this rank's host copy of its checkpoint files, kept and refilled in
        # place by every save (by file name under the checkpoint directory).
        self._host_copies: dict[str, Any] = {}

    # ------------------------------------------------------------------ restore

    def restore(self) -> Path | None:
        """Continue from the newest complete checkpoint, if resuming and there is one.

        Returns the checkpoint directory, or None for a fresh start. A checkpoint written by
        another number of ranks is converted to DeepSpeed's universal format first (once,
        by rank 0); it must have been written under the same ZeRO stage."""
        if not self.cfg.resume:
            return None
        ckpt = self._newest_verified()
        if ckpt is None:
            return None
        saved = read_state(ckpt)
        check_same_stage(ckpt, saved, self.zero_stage)
        same_world = saved["world_size"] == self.world_size
        if not same_world and self.rank == 0:
            ensure_universal(ckpt)
        dist.barrier()
        self._load_engine(ckpt, universal=not same_world)
        for kind, obj in self.per_rank.items():
            if same_world:
                try:
                    obj.load_own(_load(ckpt / rank_file(kind, self.rank)))
                except NeedsGlobalState as exc:  # the loader's shards changed since the save
                    log.info("%s; merging every rank's %s state", exc, kind)
                    obj.load_all(rank_files(ckpt, kind))
            elif obj.load_all is not None:
                obj.load_all(rank_files(ckpt, kind))
        self.train_state.step = saved["step"]
        self.train_state.samples_seen = saved["samples_seen"]
        self.train_state.skipped_steps = saved.get("skipped_steps", 0)
        log.info("resumed from %s at step %d (%d samples seen)%s", ckpt, saved["step"],
                 saved["samples_seen"],
                 "" if same_world else f", world size {saved['world_size']} -> {self.world_size}")
        return ckpt

    def _newest_verified(self) -> Path | None:
        """The newest complete checkpoint whose files match its manifest. A damaged one is
        reported in one line, set aside as ``step_N.corrupt`` and the next older one tried;
        ``latest`` is rewritten to name the one chosen. Every rank checks its share."""
        set_aside_any = False
        while True:
            found = find_latest(self.run_dir) if self.rank == 0 else None
            found = _broadcast(str(found) if found is not None else None)
            if found is None:
                break
            ckpt = Path(found)
            manifest = read_manifest(ckpt)
            if manifest is None:
                # Written before manifests existed: nothing to check against.
                if self.rank == 0:
                    log.warning("%s has no %s: resuming without verifying it", ckpt, MANIFEST)
                break
            mine = verify_files(ckpt, manifest, share(sorted(manifest), self.rank,
                                                      self.world_size))
            problems = sorted({p for ps in _all_gather(mine) for p in ps})
            if not problems:
                break
            if self.rank == 0:
                aside = set_aside(ckpt)
                more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
                log.error("damaged checkpoint: %s%s; set aside as %s, trying the previous "
                          "checkpoint", problems[0], more, aside.name)
                set_aside_any = True
            dist.barrier()
        if self.rank == 0 and set_aside_any:
            latest = self.root / LATEST
            if found is not None:
                atomic_write(latest, Path(found).name + "\n", durable=True)
            else:
                latest.unlink(missing_ok=True)
                log.error("no checkpoint in %s verifies; starting from scratch", self.root)
        return Path(found) if found is not None else None

    def _load_engine(self, ckpt: Path, universal: bool) -> None:
        """Model weights, fp32 master weights and optimizer state into the built engine."""
        # DeepSpeed reads this flag only when loading; setting it here (rather than in the
        # engine's config before it is built) keeps the resume decision in one place.
        self.engine._config.load_universal_checkpoint = universal
        tag = UNIVERSAL_TAG if universal else DS_TAG
        path, _ = self.engine.load_checkpoint(
            str(ckpt), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False,
            load_module_strict=True,
        )
        if path is None:
            raise RuntimeError(f"{ckpt / tag}: DeepSpeed could not load this checkpoint")

    # ------------------------------------------------------------------ save

    def _stage(self, tmp: Path, healthy: bool) -> Staged:
        """This rank's files of the checkpoint (rank 0 also the run's state and config), ready
        to write; copied to host memory for an asynchronous save, as is for a synchronous
        one (written at once, so nothing is copied)."""
        staged = Staged(tmp, self.train_state.step,
                        self._host_copies if self.cfg.async_save else None)
        staging = StagingEngine(self.engine.checkpoint_engine, staged)
        self.engine.checkpoint_engine = staging
        try:
            # The universal-checkpoint info lets ds_to_universal convert this checkpoint
            # when the run resumes on a different number of ranks.
            self.engine.save_checkpoint(
                str(tmp), tag=DS_TAG, save_latest=False,
                client_state={UNIVERSAL_CHECKPOINT_INFO: {
                    UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}},
            )
        finally:
            self.engine.checkpoint_engine = staging.inner
        for kind, obj in self.per_rank.items():
            staged.put(tmp / rank_file(kind, self.rank), torch.save, obj.state_dict())
        if self.rank == 0:
            state = {**asdict(self.train_state), "world_size": self.world_size,
                     "zero_stage": self.zero_stage, "healthy": healthy, **self.run_info()}
            for path, text in ((tmp / "config.yaml", self.config_yaml),
                               (tmp / STATE, json.dumps(state, indent=1, sort_keys=True))):
                staged.put(path, lambda text, path: atomic_write(path, text), text)
        if staged.host_copies is not None and torch.cuda.is_available():
            torch.cuda.synchronize()  # the device-to-pinned-host copies have landed
        return staged

    def _abandon(self, tmp: Path, error: BaseException | None, first: str) -> None:
        """Remove a partial checkpoint (rank 0) and raise one error on every rank."""
        written = 0
        if self.rank == 0:
            written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        # The newest checkpoint's size is what one more needs; without one, what this
        # attempt had written is a lower bound.
        needed = max(checkpoint_bytes(find_latest(self.run_dir)), written)
        if _is_disk_full(error or OSError(first), self.root, needed):
            msg = (f"disk full at {self.root} ({needed} bytes needed for a checkpoint, "
                   f"{shutil.disk_usage(self.root).free} free); the partial checkpoint "
                   f"{tmp.name} was removed")
        else:
            msg = f"could not write checkpoint {tmp}: {error or first}; it was removed"
        raise CheckpointWriteError(msg) from error

    def save(self, healthy: bool = True) -> Path:
        """Write a checkpoint of the current step from every rank; ``healthy`` records
        whether it passed the loop's health checks (see ``train.max_weight_norm``).

        With ``checkpoint.async_save`` it returns once the checkpoint is copied to host
        memory; the returned directory exists after :meth:`wait`. One save is in flight at
        a time: this waits for the previous one first."""
        self.wait()
        step = self.train_state.step
        final = self.root / step_dir_name(step)
        tmp = self.root / (TMP_PREFIX + final.name)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash during an earlier attempt
            for kind in self.per_rank:
                (tmp / kind).mkdir(parents=True)
            if self.cfg.async_save:
                (tmp / PARTS).mkdir()
        dist.barrier()
        # A failed write on any rank (disk full) is agreed on by all ranks: the partial
        # directory is removed (it would keep the disk full for the restart) and every
        # rank raises the same one-line error.
        hashes: dict[str, Any] = {}
        error = None
        try:
            staged = self._stage(tmp, healthy)  # written already unless async_save
        except Exception as exc:  # noqa: BLE001  (re-raised below on every rank)
            log.debug("checkpoint write failed on rank %d", self.rank, exc_info=True)
            error = exc
        errors = _all_gather(None if error is None else repr(error))
        if self.cfg.async_save and not any(errors):
            job = _Background(lambda: self._write_in_background(job, final), staged)
            self._pending = job
            job.thread.start()
            return final
        if error is None and not any(errors):
            # Every file is written: each rank fsyncs and hashes its share (one read of
            # 1/world of the bytes, mostly from the page cache), rank 0 collects them.
            rels = _broadcast(checkpoint_files(tmp) if self.rank == 0 else None)
            try:
                hashes = hash_files(tmp, share(rels, self.rank, self.world_size))
            except Exception as exc:  # noqa: BLE001
                error = exc
            errors = _all_gather(None if error is None else repr(error))
        if any(errors):
            self._abandon(tmp, error, next(e for e in errors if e))
        hashes = _all_gather(hashes)
        if self.rank == 0:
            self._commit(tmp, final, step, {rel: h for part in hashes for rel, h in part.items()})
        dist.barrier()
        return final

    def _commit(self, tmp: Path, final: Path, step: int, files: dict[str, Any]) -> None:
        """Rank 0, once every file is written, fsynced and hashed: the manifest, the marker,
        the rename, ``latest``, pruning."""
        atomic_write_json(tmp / MANIFEST, {"files": files}, durable=True)
        # Order matters for a power loss: file contents (fsynced by hash_files), then every
        # directory entry, then the marker, then the rename, then the parent's entry.
        fsync_tree(tmp)
        atomic_write(tmp / MARKER, f"{step}\n", durable=True)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(self.root)
        atomic_write(self.root / LATEST, final.name + "\n", durable=True)
        prune(self.run_dir, self.cfg.keep_last)
        log.info("checkpoint saved: %s", final)

    def _write_in_background(self, job: _Background, final: Path) -> None:
        """The thread of an asynchronous save: write, fsync and hash this rank's files,
        leave its part file; rank 0 then commits. No collectives here (see the module
        docstring); errors are kept for :meth:`wait`."""
        staged = job.staged
        try:
            try:
                rels = staged.write()
                result: dict[str, Any] = {"files": hash_files(staged.tmp, rels)}
            except Exception as exc:  # noqa: BLE001  (raised by wait() on every rank)
                log.debug("checkpoint write failed on rank %d", self.rank, exc_info=True)
                job.error, result = exc, {"error": repr(exc)}
            atomic_write_json(staged.tmp / PARTS / f"rank_{self.rank:05d}.json", result)
        except Exception as exc:  # noqa: BLE001
            job.error = job.error or exc
        finally:
            job.parts_written.set()
        if self.rank != 0 or job.error is not None:
            return
        try:
            files = self._collect_parts(staged.tmp, job)
            if files is not None:
                self._commit(staged.tmp, final, staged.step, files)
        except Exception as exc:  # noqa: BLE001
            log.debug("checkpoint commit failed", exc_info=True)
            job.error = exc

    def _collect_parts(self, tmp: Path, job: _Background) -> dict[str, Any] | None:
        """Rank 0: every rank's hashes plus those of files no rank claimed (DeepSpeed copies
        its recovery script itself); None when a rank failed (its error reaches wait())."""
        parts = [tmp / PARTS / f"rank_{r:05d}.json" for r in range(self.world_size)]
        deadline = time.monotonic() + self.wait_timeout_s
        while not all(p.is_file() for p in parts):
            if job.cancel.is_set():
                return None
            if time.monotonic() > deadline:
                missing = [p.name for p in parts if not p.is_file()]
                raise TimeoutError(f"no result from {', '.join(missing)} after "
                                   f"{self.wait_timeout_s:g} s")
            time.sleep(0.05)
        files: dict[str, Any] = {}
        for p in parts:
            result = json.loads(p.read_text(encoding="utf-8"))
            if "error" in result:
                return None
            files.update(result["files"])
        shutil.rmtree(tmp / PARTS)  # not part of the checkpoint (nor of its manifest)
        files.update(hash_files(tmp, [r for r in checkpoint_files(tmp) if r not in files]))
        return files

    def wait(self) -> None:
        """Finish the asynchronous save in flight, if any (a collective): when every rank
        wrote its part, rank 0's COMPLETE is written before this returns. A failure on any
        rank removes the partial checkpoint and raises the same CheckpointWriteError on
        every rank."""
        job, self._pending = self._pending, None
        if job is None:
            return
        job.parts_written.wait()
        errors = _all_gather(None if job.error is None else repr(job.error))
        if any(errors):
            job.cancel.set()
        job.thread.join()
        if not any(errors):  # rank 0's commit
            errors = _all_gather(None if job.error is None else repr(job.error))
        if any(errors):
            self._abandon(job.staged.tmp, job.error, next(e for e in errors if e))

    def finish_local(self) -> None:
        """Let this rank's asynchronous save finish without collectives, while an exception
        unwinds (the other ranks may not reach a collective). Its checkpoint is complete if
        every rank's part was written; an error is logged, not raised."""
        job, self._pending = self._pending, None
        if job is None:
            return
        job.thread.join()
        if job.error is not None:
            log.error("checkpoint %s was not completed: %r", job.staged.tmp, job.error)


def check_same_stage(ckpt: Path, saved: dict[str, Any], zero_stage: int) -> None:
    """A checkpoint resumes at any world size, but only under the ZeRO stage that wrote it:
    DeepSpeed's universal checkpoints re-shard across ranks, not across stages."""
    if saved["zero_stage"] != zero_stage:
        raise ConfigError(
            f"train.zero_stage: {ckpt} was written with ZeRO-{saved['zero_stage']}; resuming "
            f"with ZeRO-{zero_stage} is not supported. Keep train.zero_stage="
            f"{saved['zero_stage']}, or start a new --run-dir with model.init_from={ckpt} "
            "(add model.init_optimizer=true to carry the optimizer state over)."
        )


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and stale temp dirs."""
    done = complete_checkpoints(run_dir)
    healthy = newest_healthy(run_dir)  # never pruned: the one a wrecked run goes back to
    for path in done[:-keep_last]:
        if path == healthy:
            continue
        if not delete_unless_read(path):
            log.info("%s is being read (export or evaluation); it is pruned later", path)
    newest = checkpoint_step(done[-1]) if done else -1
    for path in checkpoints_dir(run_dir).glob(TMP_PREFIX + "step_*"):
        step = checkpoint_step(path.with_name(path.name[len(TMP_PREFIX):]))
        if step is not None and step <= newest:
            shutil.rmtree(path, ignore_errors=True)


def ensure_universal(ckpt: Path) -> Path:
    """Convert ``ckpt/ds`` into ``ckpt/universal`` once (rank 0 only; idempotent)."""
    out = ckpt / UNIVERSAL_TAG
    if not (out / "zero").is_dir():
        log.info("converting %s to a DeepSpeed universal checkpoint (world size changed)", ckpt)
    return convert_to_universal(ckpt / DS_TAG, out)
