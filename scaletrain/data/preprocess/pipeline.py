"""The preprocessing run of one rank: its shards, raw samples in, latent shards out.

DataLoader workers read and decode raw shards (:mod:`.samples`); the main process groups
the prepared samples by (shard, bucket), runs the encoders one batch of one bucket at a
time, and writes each shard when its last sample is encoded (:mod:`.output`). Decoding
thus overlaps encoding, and several shards are in flight at once (one per worker).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.utils.data import DataLoader
from tqdm import tqdm

from scaletrain.data import shard_format as sf
from scaletrain.data import storage
from scaletrain.data.encoders import build_image_encoder, build_text_encoder, unbatch_text
from scaletrain.data.preprocess.config import PreprocessConfig, output_fingerprint
from scaletrain.data.preprocess.output import (
    ShardLocks,
    ShardOutput,
    check_same_config,
    finalize_index,
    record_failure,
    remove_stale_temporaries,
    shard_is_complete,
    write_plan,
)
from scaletrain.data.preprocess.samples import (
    Prepared,
    RawShardDataset,
    ShardBegin,
    ShardEnd,
    Skipped,
    bucket_list,
    worker_init,
)
from scaletrain.data.preprocess.work import (
    assign,
    check_output_apart,
    expand_inputs,
    shard_table,
)
from scaletrain.data.storage import StorageConfig

log = logging.getLogger(__name__)


@dataclass
class PreprocessSummary:
    """What one call of :func:`preprocess_shards` did (``merge`` adds up several ranks)."""

    rank: int = 0
    world: int = 1
    shards_assigned: int = 0
    shards_done: int = 0
    shards_already_complete: int = 0
    shards_failed: list[dict[str, str]] = field(default_factory=list)
    # Shards another preprocess run on the same output was writing (left to it).
    shards_held_elsewhere: int = 0
    samples_written: int = 0
    samples_skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        total = self.samples_written + self.samples_skipped
        return total / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_second": round(self.samples_per_second, 2)}

    @staticmethod
    def merge(parts: list[PreprocessSummary]) -> PreprocessSummary:
        out = PreprocessSummary(rank=0, world=max((p.world for p in parts), default=1))
        reasons: Counter[str] = Counter()
        for p in parts:
            out.shards_assigned += p.shards_assigned
            out.shards_done += p.shards_done
            out.shards_already_complete += p.shards_already_complete
            out.shards_failed += p.shards_failed
            out.shards_held_elsewhere += p.shards_held_elsewhere
            out.samples_written += p.samples_written
            out.samples_skipped += p.samples_skipped
            reasons.update(p.skipped_by_reason)
            out.seconds = max(out.seconds, p.seconds)
        out.skipped_by_reason = dict(sorted(reasons.items()))
        return out

    def describe(self) -> str:
        lines = [
            f"shards: {self.shards_done} written, {self.shards_already_complete} already "
            f"complete, {len(self.shards_failed)} failed (of {self.shards_assigned} assigned "
            f"to {self.world} rank{'s' if self.world > 1 else ''})",
            f"samples: {self.samples_written} written, {self.samples_skipped} skipped in "
            f"{self.seconds:.1f} s ({self.samples_per_second:.1f} samples/s)",
        ]
        if self.skipped_by_reason:
            lines.append(
                "skipped: " + ", ".join(f"{k} {v}" for k, v in self.skipped_by_reason.items())
            )
        for failure in self.shards_failed:
            lines.append(f"FAILED {failure['shard']}: {failure['reason']}")
        return "\n".join(lines)


class _Encoders:
    """Both encoders, plus what manifests say about them."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.image = build_image_encoder(cfg)
        self.text = build_text_encoder(cfg)
        for h, w in bucket_list(cfg):
            if h % self.image.downsample or w % self.image.downsample:
                raise ValueError(
                    f"bucket {h}x{w} is not a multiple of the image encoder's downsampling "
                    f"factor {self.image.downsample}"
                )
        self.identity = {
            "image_encoder": self.image.identity(),
            "text_encoder": self.text.identity(),
        }

    @torch.no_grad()
    def encode(self, items: list[Prepared]) -> list[tuple[dict, dict]]:
        pixels = torch.from_numpy(np.stack([it.pixels for it in items])).float()
        latents = self.image.encode(pixels / 127.5 - 1.0)
        # Captions repeat (the demo's always do); encode each distinct one once.
        unique = list(dict.fromkeys(it.caption for it in items))
        per_caption = dict(zip(unique, unbatch_text(self.text.encode(unique))))
        return [
            (
                {"mean": latents["mean"][i].clone(), "std": latents["std"][i].clone()},
                per_caption[it.caption],
            )
            for i, it in enumerate(items)
        ]


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte header length, JSON header)."""
    (length,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


def write_empty_prompt(out_dir: str, text_encoder, fingerprint: str,
                       cfg: StorageConfig | None = None) -> None:
    """``empty_prompt.text.safetensors``: the "no caption" conditioning for CFG dropout."""
    path = storage.join(out_dir, sf.EMPTY_PROMPT_NAME)
    try:
        if _safetensors_metadata(storage.read_bytes(path, cfg)).get(
                "config_fingerprint") == fingerprint:
            return
    except Exception:  # noqa: BLE001 - absent or unreadable: (re)write it
        pass
    tensors = unbatch_text(text_encoder.encode([""]))[0]
    data = save_tensors(tensors, metadata={"config_fingerprint": fingerprint})
    load_tensors(data)  # round-trip check before it replaces anything
    storage.write_bytes(path, data, cfg)


def preprocess_shards(
    cfg: PreprocessConfig,
    inputs: str | list[str],
    output_dir: str | Path,
    rank: int = 0,
    world: int = 1,
    finalize: bool = True,
    verify: bool = False,
    storage_cfg: StorageConfig | None = None,
) -> PreprocessSummary:
    """Preprocess this rank's share of ``inputs`` into ``output_dir``.

    ``inputs`` are shard URLs or patterns (braces, ``::`` lists, globs, ``pipe:``); every
    rank must pass the same ones. Shard i goes to rank i mod world. Complete shards are
    skipped (``verify`` also re-hashes their tars), everything else is (re)done. When
    ``finalize`` is set the index is rebuilt at the end from whatever is complete by then;
    see the package docstring for how a job array ends with a final, complete index.
    Inputs and ``output_dir`` may be URLs (``s3://...``) reached with ``storage_cfg``.
    """
    start = time.perf_counter()
    out_dir = str(output_dir)
    storage.check_url(out_dir, "--output")
    urls = expand_inputs(inputs, storage_cfg)
    check_output_apart(out_dir, urls)
    if storage.is_local(out_dir):
        out_dir = str(storage.local_path(out_dir))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    fingerprint = output_fingerprint(cfg)
    table = shard_table(urls)
    check_same_config(out_dir, cfg, storage_cfg)
    write_plan(out_dir, table, cfg, storage_cfg)
    mine = assign(table, rank, world)
    todo = [(s, u) for s, u in mine
            if not shard_is_complete(out_dir, s, fingerprint, verify, storage_cfg, u)]
    summary = PreprocessSummary(rank=rank, world=world, shards_assigned=len(mine))
    summary.shards_already_complete = len(mine) - len(todo)
    log.info(
        "rank %d/%d: %d shards assigned, %d already complete, %d to do -> %s",
        rank,
        world,
        len(mine),
        summary.shards_already_complete,
        len(todo),
        out_dir,
    )
    locks = ShardLocks(out_dir)
    try:
        mine_now, theirs = locks.claim([stem for stem, _ in todo])
        if theirs:
            log.warning("rank %d/%d: %d shards are being written by another preprocess run on "
                        "%s (%s%s); left to it", rank, world, len(theirs), out_dir,
                        ", ".join(theirs[:5]), " ..." if len(theirs) > 5 else "")
        todo = [(s, u) for s, u in todo if s in set(mine_now)]
        summary.shards_held_elsewhere = len(theirs)
        remove_stale_temporaries(out_dir, [stem for stem, _ in todo])
        if todo:
            if cfg.cpu_threads:
                torch.set_num_threads(cfg.cpu_threads)
            encoders = _Encoders(cfg)
            write_empty_prompt(out_dir, encoders.text, fingerprint, storage_cfg)
            _ShardRun(cfg, out_dir, encoders, fingerprint, summary, rank, len(todo),
                      storage_cfg).run(todo)
    finally:
        locks.release()
    summary.seconds = time.perf_counter() - start
    if finalize:
        finalize_index(out_dir, storage_cfg)
    log.info("rank %d/%d done:\n%s", rank, world, summary.describe())
    return summary


class _ShardRun:
    """The main-process side of one rank: buffers per (shard, bucket), encode, write."""

    def __init__(self, cfg, out_dir, encoders, fingerprint, summary, rank, num_shards,
                 storage_cfg=None):
        self.cfg = cfg
        self.storage_cfg = storage_cfg
        self.out_dir = out_dir
        self.encoders = encoders
        self.fingerprint = fingerprint
        self.summary = summary
        self.open: dict[str, ShardOutput] = {}
        self.ends: dict[str, list[ShardEnd]] = {}  # shard -> ends of its parts so far
        self.buffers: dict[str, dict[tuple[int, int], list[Prepared]]] = defaultdict(dict)
        self.reasons: Counter[str] = Counter()
        self.pending = 0  # samples waiting in buffers
        # Bound on waiting samples (memory): a few full batches per decoding worker.
        self.max_pending = 4 * cfg.batch_size * max(1, cfg.decode_workers)
        self.rank = rank
        self.num_shards = num_shards
        self.bar = _progress(cfg.progress, rank, num_shards)

    def run(self, todo: list[tuple[str, str]]) -> None:
        workers = self.cfg.decode_workers
        loader = DataLoader(
            RawShardDataset(todo, self.cfg, self.storage_cfg),
            batch_size=None,
            num_workers=workers,
            worker_init_fn=worker_init if workers else None,
            prefetch_factor=4 if workers else None,
        )
        try:
            for msg in loader:
                self.handle(msg)
        finally:
            for shard in self.open.values():
                shard.abort()
            if self.bar is not None:
                self.bar.close()
        self.summary.skipped_by_reason = {k: v for k, v in sorted(self.reasons.items()) if v}

    def handle(self, msg) -> None:
        if isinstance(msg, ShardBegin):
            if msg.stem not in self.ends:
                self.open[msg.stem] = ShardOutput(self.out_dir, msg.stem, msg.url,
                                                  self.storage_cfg)
                self.ends[msg.stem] = []
            return
        if msg.stem not in self.open:
            return  # a part of a shard that already failed: its samples are discarded
        if isinstance(msg, Prepared):
            bucket = tuple(msg.meta["bucket"])
            pending = self.buffers[msg.stem].setdefault(bucket, [])
            pending.append(msg)
            self.pending += 1
            if len(pending) >= self.cfg.batch_size:
                self.flush(msg.stem, bucket)
            elif self.pending > self.max_pending:
                # Many buckets x many open shards could hold thousands of images waiting
                # for full batches; past the cap, encode the fullest buffer as it is.
                stem, bucket = max(
                    ((st, b) for st, bs in self.buffers.items() for b in bs),
                    key=lambda sb: len(self.buffers[sb[0]][sb[1]]),
                )
                self.flush(stem, bucket)
        elif isinstance(msg, Skipped):
            self.open[msg.stem].skip(msg.key, msg.code, msg.reason)
            if msg.key is not None:
                self.summary.samples_skipped += 1
                self.reasons[msg.code] += 1
                self._tick(1)
        elif isinstance(msg, ShardEnd):
            self.end_part(msg)
        else:  # pragma: no cover - a programming error
            raise TypeError(f"unexpected message {type(msg).__name__}")

    def flush(self, stem: str, bucket: tuple[int, int]) -> None:
        items = self.buffers[stem].pop(bucket, [])
        if not items:
            return
        self.pending -= len(items)
        shard = self.open[stem]
        for it, (latent, text) in zip(items, self.encoders.encode(items)):
            shard.write(sf.encode_sample(it.key, latent, text, it.meta), bucket)
        self.summary.samples_written += len(items)
        self._tick(len(items))

    def end_part(self, end: ShardEnd) -> None:
        ends = self.ends[end.stem]
        ends.append(end)
        if end.failed and end.stem in self.open:
            # Not committed: no manifest, so a rerun retries it. What was encoded for it
            # goes with the temporary tar; its other parts' messages are dropped.
            log.error("shard %s failed: %s", end.stem, end.failed)
            self.pending -= sum(len(v) for v in self.buffers.pop(end.stem, {}).values())
            shard = self.open.pop(end.stem)
            self.summary.samples_skipped -= sum(shard.skip_counts.values())
            self.summary.samples_written -= shard.num_samples
            self.reasons.subtract(shard.skip_counts)
            shard.abort()
            record_failure(self.out_dir, end.stem, end.url, end.failed, self.storage_cfg)
            self.summary.shards_failed.append({"shard": end.stem, "reason": end.failed})
        if len(ends) < end.parts:
            return
        del self.ends[end.stem]
        if end.stem in self.open:
            for bucket in sorted(self.buffers.get(end.stem, {})):
                self.flush(end.stem, bucket)
            self.buffers.pop(end.stem, None)
            total = ShardEnd(
                end.stem,
                end.url,
                num_groups=sum(e.num_groups for e in ends),
                input_sha256=end.input_sha256,
                input_bytes=end.input_bytes,
                tar_problem=next((e.tar_problem for e in ends if e.tar_problem), None),
            )
            manifest = self.open.pop(end.stem).commit(
                total, self.encoders.identity, self.fingerprint
            )
            self.summary.shards_done += 1
            log.info(
                "shard %s: %d samples, %d skipped%s",
                end.stem,
                manifest["num_samples"],
                manifest["num_skipped"],
                f" (tar damaged: {total.tar_problem})" if total.tar_problem else "",
            )
        if self.bar is not None:
            done = self.summary.shards_done + len(self.summary.shards_failed)
            self.bar.set_description(f"rank {self.rank} shards {done}/{self.num_shards}")

    def _tick(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(errors=self.summary.samples_skipped, refresh=False)


def _progress(enabled: bool, rank: int, total_shards: int):
    if not enabled:
        return None
    interactive = sys.stderr.isatty()
    local = os.environ.get("LOCAL_RANK", "")
    return tqdm(
        desc=f"rank {rank} shards 0/{total_shards}",
        unit=" samples",
        # Local processes sharing a terminal each get their own line.
        position=int(local) if local.isdigit() and interactive else None,
        dynamic_ncols=True,
        # A SLURM log is a file: a line every 30 s, not a redraw every half second.
        mininterval=0.5 if interactive else 30.0,
    )
