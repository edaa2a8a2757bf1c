"""Aspect-ratio buckets, resize-and-crop, and SDXL's micro-conditioning.

SDXL trains on buckets of about 1024^2 pixels with sides that are multiples of 64 (Podell et
al. 2023, sec. 2.3 and appendix I). Its published list is exactly the set of (h, w), both
multiples of 64, with 0.9 * area <= h * w <= area and aspect ratio at most 4; we generate it
from that rule so the same code serves any area (the demo's 64^2, or 512^2).

An image goes to the bucket whose aspect ratio is nearest in log space (so 2:1 and 1:2 are
equally far from 1:1), is resized to cover the bucket with as little cropping as possible,
and is cropped to it, at the centre or at an offset seeded by the sample key (reproducible
on rerun, different across samples). SDXL conditions on where the crop was taken
(sec. 2.2): ``original_size`` (h, w) before resizing, ``crop_top_left`` (top, left) in the
resized image, ``target_size`` (h, w) = the bucket.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from PIL import Image

# SDXL keeps buckets within 10% below the target area (none above it).
MIN_AREA_FRACTION = 0.9

RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
}


def generate_buckets(
    resolution: int, step: int = 64, max_aspect_ratio: float = 4.0
) -> list[tuple[int, int]]:
    """Every (h, w), multiples of ``step``, with 0.9*res^2 <= h*w <= res^2 and aspect within
    ``max_aspect_ratio``; sorted by aspect ratio h/w. At 1024 and 64 this is SDXL's list."""
    area = resolution * resolution
    longest = int(math.sqrt(area * max_aspect_ratio)) // step * step
    buckets = []
    for h in range(step, longest + 1, step):
        for w in range(step, longest + 1, step):
            if not MIN_AREA_FRACTION * area <= h * w <= area:
                continue
            if max(h, w) / min(h, w) > max_aspect_ratio + 1e-9:
                continue
            buckets.append((h, w))
    if not buckets:
        raise ValueError(
            f"no bucket with sides multiple of {step} has about {resolution}^2 pixels; "
            f"use a resolution that is a multiple of the step"
        )
    return sorted(buckets, key=lambda hw: hw[0] / hw[1])


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's, in log space."""
    target = math.log(height / width)
    return min(buckets, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - target), -hw[0] * hw[1]))


@dataclass(frozen=True)
class CropResult:
    image: Image.Image  # the bucket-sized crop, RGB
    original_size: tuple[int, int]  # (h, w) of the input
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]  # (h, w) = the bucket


def crop_offset_rng(seed: int, key: str) -> random.Random:
    """A generator seeded by (seed, key): the same crop on every rerun and every worker."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def resize_and_crop(
    image: Image.Image,
    bucket: tuple[int, int],
    crop: str = "center",
    rng: random.Random | None = None,
    resample: str = "lanczos",
) -> CropResult:
    """Resize ``image`` to cover ``bucket`` (keeping its aspect ratio) and crop to it."""
    width, height = image.size
    target_h, target_w = bucket
    scale = max(target_h / height, target_w / width)
    # Round up so that float error never leaves a side one pixel short of the bucket.
    new_h = max(target_h, math.ceil(height * scale - 1e-6))
    new_w = max(target_w, math.ceil(width * scale - 1e-6))
    if (new_w, new_h) != (width, height):
        # reducing_gap: a cheap box pre-shrink before the filter, visually lossless at 3.
        image = image.resize((new_w, new_h), RESAMPLE[resample], reducing_gap=3.0)
    slack_h, slack_w = new_h - target_h, new_w - target_w
    if crop == "center":
        top, left = slack_h // 2, slack_w // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("random crop needs an rng (see crop_offset_rng)")
        top, left = rng.randint(0, slack_h), rng.randint(0, slack_w)
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    cropped = image.crop((left, top, left + target_w, top + target_h))
    return CropResult(cropped, (height, width), (top, left), (target_h, target_w))
