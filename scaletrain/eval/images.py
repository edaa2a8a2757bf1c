"""Images for FID, read from an image folder or raw shards, and made into Inception input.

A *folder* is read as pytorch-fid reads one: the files directly in it whose names end in one
of pytorch-fid's lower-case image extensions, sorted by path. A *shard pattern*
(``raw/{00000..00009}.tar``, globs, ``pipe:`` URLs) is read with the preprocessing's raw-shard
reader: the first image file of each sample (jpg, jpeg, png, webp).

Images are decoded by the project's decoder (:func:`scaletrain.data.images.decode_image`,
without EXIF rotation, as pytorch-fid does not rotate): 8-bit RGB, transparency composited on
white. An image that cannot be decoded is skipped and counted, never fatal.

The work is cut into *units* (a batch of files, or one shard) that :mod:`.sharing` deals to
the ranks, so every rank reads and extracts features for its own part of a reference set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_fid.fid_score import IMAGE_EXTENSIONS

from scaletrain.data.images import SkipSample, decode_image
from scaletrain.data.preprocess.raw import RawSample, iter_raw_samples
from scaletrain.data.preprocess.samples import IMAGE_EXTS
from scaletrain.data.preprocess.work import expand_inputs
from scaletrain.sample.image_grid import images_to_uint8

log = logging.getLogger(__name__)

# Far above any real image; only a decompression bomb is refused.
MAX_PIXELS = 178_956_970


@dataclass(frozen=True)
class ImageUnit:
    """Files read together (a folder's batch), or one shard."""

    files: tuple[Path, ...] = ()
    shard: str = ""


@dataclass
class UnitImages:
    images: list[Image.Image] = field(default_factory=list)
    skipped: int = 0


def image_units(source: str | Path, files_per_unit: int) -> list[ImageUnit]:
    """The units of an image folder or a shard pattern; a clear error when it holds none."""
    path = Path(source)
    if path.is_dir():
        files = sorted(f for ext in IMAGE_EXTENSIONS for f in path.glob(f"*.{ext}"))
        if not files:
            raise ValueError(f"{path}: no image files (*.{', *.'.join(sorted(IMAGE_EXTENSIONS))})")
        return [ImageUnit(files=tuple(files[s:s + files_per_unit]))
                for s in range(0, len(files), files_per_unit)]
    try:
        urls = expand_inputs(str(source))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{source}: neither an image folder nor shards: {exc}") from exc
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:")
               and not Path(u).exists()]
    if missing:
        raise ValueError(f"{missing[0]}: no such image folder or shard")
    return [ImageUnit(shard=url) for url in urls]


def read_unit(unit: ImageUnit) -> UnitImages:
    """The decodable images of a unit, in order, and how many could not be read."""
    out = UnitImages()
    if unit.files:
        for path in unit.files:
            try:
                out.images.append(decode_image(path.read_bytes(), MAX_PIXELS,
                                               exif_transpose=False))
            except (SkipSample, OSError) as exc:
                out.skipped += 1
                log.warning("%s: skipped: %s", path, exc)
        return out
    try:
        for raw in iter_raw_samples(unit.shard):
            if not isinstance(raw, RawSample):
                log.warning("%s: %s", unit.shard, raw.reason)
                continue
            ext = next((e for e in IMAGE_EXTS if e in raw.files), None)
            if ext is None:
                continue  # a sample without an image (or a stray file): not an image
            try:
                out.images.append(decode_image(raw.files[ext], MAX_PIXELS, exif_transpose=False))
            except SkipSample as exc:
                out.skipped += 1
                log.warning("%s: %s.%s: skipped: %s", unit.shard, raw.key, ext, exc)
    except OSError as exc:
        out.skipped += 1
        log.warning("%s: unreadable shard, skipped: %s", unit.shard, exc)
    return out


def center_crop_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the largest centred region of the target aspect and resize it (PIL bicubic) to
    ``size`` = (height, width): how a reference set is matched to the generated resolution."""
    h, w = size
    width, height = image.size
    scale = min(width / w, height / h)
    cw, ch = round(w * scale), round(h * scale)
    left, top = (width - cw) // 2, (height - ch) // 2
    return image.resize((w, h), Image.BICUBIC, box=(left, top, left + cw, top + ch))


def pil_to_unit_range(image: Image.Image) -> torch.Tensor:
    """8-bit RGB -> [3, H, W] float32 in [0, 1], as torchvision's ToTensor (pytorch-fid)."""
    array = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    return array.permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def generated_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """Generated images [N, 3, H, W] in [-1, 1] -> [0, 1], quantised to 8 bits first: the
    features are those of the PNGs ``scaletrain sample`` would write."""
    uint8 = torch.from_numpy(images_to_uint8(pixels))  # [N, H, W, 3]
    return uint8.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)


def same_size_batches(tensors: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Consecutive tensors of one size stacked, at most ``batch_size`` a batch."""
    out: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    for t in tensors:
        if run and (t.shape != run[0].shape or len(run) == batch_size):
            out.append(torch.stack(run))
            run = []
        run.append(t)
    if run:
        out.append(torch.stack(run))
    return out
