"""SDXL's bucket list from its rule; nearest bucket; resize+crop and micro-conditioning."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scaletrain.data.buckets import (
    crop_offset_rng,
    generate_buckets,
    nearest_bucket,
    resize_and_crop,
)

# SDXL's published buckets (Podell et al. 2023, appendix I), as (h, w) with h <= w.
SDXL_LANDSCAPE = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728),
    (576, 1664), (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344),
    (768, 1344), (768, 1280), (832, 1216), (832, 1152), (896, 1152), (896, 1088),
    (960, 1088), (960, 1024), (1024, 1024),
]  # fmt: skip


def test_generated_buckets_at_1024_are_sdxls_list():
    expected = set(SDXL_LANDSCAPE) | {(w, h) for h, w in SDXL_LANDSCAPE}
    buckets = generate_buckets(1024, 64, 4.0)
    assert set(buckets) == expected and len(buckets) == 41
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios)


def test_small_areas_and_steps():
    assert generate_buckets(64, 64, 4.0) == [(64, 64)]
    small = generate_buckets(256, 64, 2.0)
    assert (256, 256) in small and all(h % 64 == 0 and w % 64 == 0 for h, w in small)
    assert all(max(h, w) / min(h, w) <= 2.0 for h, w in small)
    assert all(0.9 * 256**2 <= h * w <= 256**2 for h, w in small)
    with pytest.raises(ValueError, match="no bucket"):
        generate_buckets(100, 64, 1.0)


def test_nearest_bucket_by_log_aspect():
    buckets = generate_buckets(1024, 64, 4.0)
    assert nearest_bucket(1000, 1000, buckets) == (1024, 1024)
    assert nearest_bucket(1080, 1920, buckets) == (768, 1344)  # 16:9 -> 1.75
    assert nearest_bucket(1920, 1080, buckets) == (1344, 768)
    assert nearest_bucket(100, 10000, buckets) == (512, 2048)  # beyond the widest: clamps


def test_center_crop_records_sdxl_micro_conditioning():
    img = Image.new("RGB", (300, 200))  # w x h
    res = resize_and_crop(img, (64, 64), "center")
    assert res.image.size == (64, 64)
    assert res.original_size == (200, 300)
    assert res.target_size == (64, 64)
    # 200 -> 64 scales 300 -> 96: 32 pixels of slack, centre crop starts at 16.
    assert res.crop_top_left == (0, 16)


def test_crop_keeps_the_content_it_claims():
    # Left half black, right half white: a centre crop of a 2:1 image into 1:1 must show both.
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    arr[:, 100:] = 255
    res = resize_and_crop(Image.fromarray(arr), (64, 64), "center", resample="bilinear")
    out = np.asarray(res.image)
    assert out[:, :28].max() < 10 and out[:, 36:].min() > 245

    # A crop at left=0 is all black; the recorded offset says where the crop was.
    class Zero:
        def randint(self, a, b):
            return a

    left = resize_and_crop(
        Image.fromarray(arr), (64, 64), "random", rng=Zero(), resample="bilinear"
    )
    assert left.crop_top_left == (0, 0) and np.asarray(left.image)[:, :60].max() < 10


def test_random_crop_is_seeded_by_key():
    img = Image.new("RGB", (400, 100))
    offsets = {
        key: resize_and_crop(img, (64, 64), "random", crop_offset_rng(0, key)).crop_top_left
        for key in ("a", "b", "c", "d", "e")
    }
    again = resize_and_crop(img, (64, 64), "random", crop_offset_rng(0, "a")).crop_top_left
    assert again == offsets["a"]
    assert len(set(offsets.values())) > 1  # different keys, different crops
    assert all(top == 0 and 0 <= left <= 256 - 64 for top, left in offsets.values())
    other_seed = {
        resize_and_crop(img, (64, 64), "random", crop_offset_rng(1, k)).crop_top_left
        for k in offsets
    }
    assert other_seed != set(offsets.values())


def test_upscaling_small_images_to_the_bucket():
    res = resize_and_crop(Image.new("RGB", (40, 30)), (64, 128), "center")
    assert res.image.size == (128, 64)
    assert res.original_size == (30, 40)
