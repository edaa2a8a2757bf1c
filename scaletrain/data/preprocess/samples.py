"""Raw sample -> bucket-sized RGB pixels + caption + micro-conditioning, or a skip record.

:class:`RawShardDataset` runs this in DataLoader workers, so decoding and resizing overlap
the encoders in the main process. Work units are whole shards (unit i goes to worker i mod
W); when a rank has fewer shards than workers, each shard is split into parts: every part
reads the whole tar (cheap next to decoding) but prepares only the sample groups g with
g mod parts == part, so one big shard still keeps every worker busy.

Each unit emits a :class:`ShardBegin`, one :class:`Prepared` or :class:`Skipped` per sample
group it owns, and a :class:`ShardEnd` with its accounting; the main process commits a
shard when all of its parts have ended. Messages carry numpy arrays, not tensors: they are
pickled through the worker's pipe, which keeps no file descriptor open per buffered sample.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from scaletrain.data.buckets import (
    crop_offset_rng,
    generate_buckets,
    nearest_bucket,
    resize_and_crop,
)
from scaletrain.data.images import SkipSample, decode_image, set_pixel_limit
from scaletrain.data.preprocess.config import PreprocessConfig
from scaletrain.data.preprocess.raw import (
    RawSample,
    ShardReadError,
    StreamStats,
    TarProblem,
    iter_raw_samples,
)
from scaletrain.data.storage import StorageConfig

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"


@dataclass
class ShardBegin:
    stem: str
    url: str
    parts: int = 1  # units this shard is split into (each sends a ShardBegin and ShardEnd)


@dataclass
class Prepared:
    stem: str
    key: str
    pixels: np.ndarray  # (3, H, W) uint8, H x W = the bucket
    caption: str
    meta: dict[str, Any]  # original_size, crop_top_left, target_size, bucket (+ url)


@dataclass
class Skipped:
    stem: str
    key: str | None  # None for problems of the shard itself (a truncated tar)
    code: str
    reason: str


@dataclass
class ShardEnd:
    stem: str
    url: str
    part: int = 0
    parts: int = 1
    num_groups: int = 0  # sample groups of this part (each ends as Prepared or Skipped)
    input_sha256: str = ""
    input_bytes: int = 0
    tar_problem: str | None = None  # the archive was damaged (data kept up to the damage)
    failed: str | None = None  # the shard could not be read: not completed, retried on rerun
    extra: dict[str, Any] = field(default_factory=dict)


def bucket_list(cfg: PreprocessConfig) -> list[tuple[int, int]]:
    if cfg.buckets is not None:
        return [(int(h), int(w)) for h, w in cfg.buckets]
    return generate_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio)


class SamplePreparer:
    """The per-sample work: pick files, decode, filter, bucket, crop."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.buckets = bucket_list(cfg)

    def __call__(self, stem: str, raw: RawSample) -> Prepared | Skipped:
        try:
            return self._prepare(stem, raw)
        except SkipSample as skip:
            return Skipped(stem, raw.key, skip.code, skip.reason)
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop the shard
            log.debug("unexpected error on %s/%s", stem, raw.key, exc_info=True)
            return Skipped(stem, raw.key, "error", f"{type(exc).__name__}: {exc}")

    def _prepare(self, stem: str, raw: RawSample) -> Prepared:
        cfg = self.cfg
        present = ", ".join(f".{e}" for e in sorted(raw.files) if e) or "no files"
        cut = " (the tar ends inside this sample)" if raw.truncated else ""
        if "" in raw.files:
            raise SkipSample("not_a_sample", "tar member has no extension, not a sample file")
        image_ext = next((e for e in IMAGE_EXTS if e in raw.files), None)
        if image_ext is None:
            raise SkipSample(
                "missing_image", f"no image file (.jpg/.jpeg/.png/.webp); has {present}{cut}"
            )
        if CAPTION_EXT not in raw.files:
            raise SkipSample("missing_caption", f"no caption file (.txt); has {present}{cut}")
        caption = _decode_caption(raw.files[CAPTION_EXT], cfg.allow_empty_captions)
        image = decode_image(raw.files[image_ext], cfg.max_image_pixels, cfg.exif_transpose)
        width, height = image.size
        if min(width, height) < cfg.min_size:
            raise SkipSample(
                "too_small",
                f"image {width}x{height} is smaller than min_size={cfg.min_size} "
                f"on its shorter side",
            )
        aspect = max(width, height) / min(width, height)
        if aspect > cfg.max_aspect_ratio:
            raise SkipSample(
                "aspect_ratio",
                f"image {width}x{height} has aspect ratio {aspect:.2f} "
                f"> max_aspect_ratio={cfg.max_aspect_ratio}",
            )
        bucket = nearest_bucket(height, width, self.buckets)
        rng = crop_offset_rng(cfg.seed, raw.key) if cfg.crop == "random" else None
        crop = resize_and_crop(image, bucket, cfg.crop, rng, cfg.resample)
        pixels = np.ascontiguousarray(np.asarray(crop.image, dtype=np.uint8).transpose(2, 0, 1))
        meta: dict[str, Any] = {
            "caption": caption,
            "original_size": list(crop.original_size),
            "crop_top_left": list(crop.crop_top_left),
            "target_size": list(crop.target_size),
            "bucket": list(bucket),
        }
        url = _source_url(raw.files.get("json"))
        if url:
            meta["url"] = url
        return Prepared(stem, raw.key, pixels, caption, meta)


def _decode_caption(data: bytes, allow_empty: bool) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SkipSample("caption_not_utf8", f"caption is not valid UTF-8: {exc}") from None
    text = text.strip()
    if not text and not allow_empty:
        what = "empty (0 bytes)" if not data else "blank"
        raise SkipSample("empty_caption", f"caption file is {what}")
    return text


def _source_url(data: bytes | None) -> str | None:
    """img2dataset's per-sample JSON is optional and only used for provenance."""
    if not data:
        return None
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    url = meta.get("url") if isinstance(meta, dict) else None
    return url if isinstance(url, str) else None


def unsafe_key(key: str) -> tuple[str, str] | None:
    """(code, reason) when a sample key must not be written to an output tar: a path that
    leaves the directory it is extracted into (``../``, an absolute path, a drive), or a
    name WebDataset readers take for metadata (``__key__``-style, never delivered). Such
    samples are skipped and recorded in the ledger, never copied (issue 14)."""
    parts = key.replace("\\", "/").split("/")
    if key.startswith(("/", "\\")) or (len(key) > 1 and key[1] == ":") or any(
            p in ("", ".", "..") for p in parts):
        return "unsafe_key", (f"key {key[:200]!r} is an absolute path or leaves its folder "
                              "(../); not copied into an output tar")
    if parts[-1].startswith("__"):
        return "reserved_key", (f"key {key[:200]!r} starts with '__', which WebDataset "
                                "readers take for metadata: it could never be delivered")
    return None


def iter_shard(
    stem: str, url: str, preparer: SamplePreparer, part: int = 0, parts: int = 1,
    storage_cfg: StorageConfig | None = None,
) -> Iterator[Any]:
    """Messages for one shard (or one part of it): ShardBegin, Prepared/Skipped per sample
    group of this part, ShardEnd. Part 0 also reports damage to the tar itself."""
    yield ShardBegin(stem, url, parts)
    end = ShardEnd(stem, url, part, parts)
    stats = StreamStats()
    seen: set[str] = set()
    group = -1
    try:
        for item in iter_raw_samples(url, stats, storage_cfg):
            if isinstance(item, TarProblem):
                end.tar_problem = item.reason
                if part == 0:
                    yield Skipped(stem, None, item.code, item.reason)
                continue
            group += 1
            duplicate = item.key in seen
            seen.add(item.key)  # every part tracks every key, to agree on duplicates
            if group % parts != part:
                continue
            end.num_groups += 1
            unsafe = unsafe_key(item.key)
            if unsafe is not None:
                yield Skipped(stem, item.key, *unsafe)
                continue
            if duplicate:
                yield Skipped(
                    stem,
                    item.key,
                    "duplicate_key",
                    "key appears again later in the shard (its files are not consecutive)",
                )
                continue
            yield preparer(stem, item)
    except ShardReadError as exc:
        end.failed = str(exc)
    end.input_sha256, end.input_bytes = stats.sha256, stats.num_bytes
    yield end


def work_units(shards: list[tuple[str, str]], workers: int) -> list[tuple[str, str, int, int]]:
    """(stem, url, part, parts) units: whole shards, or parts when workers outnumber them."""
    parts = max(1, workers // len(shards)) if shards else 1
    return [(stem, url, p, parts) for stem, url in shards for p in range(parts)]


class RawShardDataset(IterableDataset):
    """The messages of a list of (stem, url) shards, split between DataLoader workers."""

    def __init__(self, shards: list[tuple[str, str]], cfg: PreprocessConfig,
                 storage_cfg: StorageConfig | None = None) -> None:
        super().__init__()
        self.shards = list(shards)
        self.cfg = cfg
        self.storage_cfg = storage_cfg

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        set_pixel_limit(self.cfg.max_image_pixels)
        preparer = SamplePreparer(self.cfg)
        for stem, url, part, parts in work_units(self.shards, workers)[worker::workers]:
            yield from iter_shard(stem, url, preparer, part, parts, self.storage_cfg)


def worker_init(_: int) -> None:
    # Decoding is PIL's (its own threads); torch ops here are tiny, keep them to one thread.
    torch.set_num_threads(1)
