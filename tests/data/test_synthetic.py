"""The synthetic shapes dataset: img2dataset layout, deterministic, captions that match."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

from scaletrain.data.preprocess.work import expand_inputs
from scaletrain.data.synthetic import (
    BACKGROUND,
    CAPTION_WORDS,
    COLOURS,
    SHAPES,
    draw_shape,
    parse_caption,
    write_synthetic_shards,
)


def _members(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf}


def test_layout_and_pattern(tmp_path):
    pattern = write_synthetic_shards(tmp_path, num_shards=2, samples_per_shard=3, size=32)
    assert pattern == f"{tmp_path}/{{00000..00001}}.tar"
    assert expand_inputs(pattern) == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    files = _members(tmp_path / "00001.tar")
    keys = sorted({name.split(".")[0] for name in files})
    assert keys == ["000010000", "000010001", "000010002"]
    for key in keys:
        assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(files)
        caption = files[f"{key}.txt"].decode()
        meta = json.loads(files[f"{key}.json"])
        assert meta["caption"] == caption and meta["key"] == key
        assert parse_caption(caption) == (meta["colour"], meta["shape"])
        img = Image.open(io.BytesIO(files[f"{key}.jpg"]))
        assert img.size == (32, 32) and img.format == "JPEG"


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    write_synthetic_shards(tmp_path / "a", 1, 5, seed=3)
    write_synthetic_shards(tmp_path / "b", 1, 5, seed=3)
    write_synthetic_shards(tmp_path / "c", 1, 5, seed=4)
    a = (tmp_path / "a" / "00000.tar").read_bytes()
    assert a == (tmp_path / "b" / "00000.tar").read_bytes()
    assert a != (tmp_path / "c" / "00000.tar").read_bytes()


def test_the_image_shows_the_captioned_colour_on_the_background(tmp_path):
    write_synthetic_shards(tmp_path, 1, 12, size=64, image_format="png")
    files = _members(tmp_path / "00000.tar")
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    for name, data in files.items():
        if not name.endswith(".png"):
            continue
        colour, _ = parse_caption(files[name.replace(".png", ".txt")].decode())
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
        corner = arr[0, 0]
        assert np.abs(corner - BACKGROUND).max() < 8  # plain background
        fg = arr.reshape(-1, 3)[np.abs(arr.reshape(-1, 3) - BACKGROUND).sum(1) > 60]
        assert len(fg) > 0.06 * 64 * 64  # the shape covers a real part of the image
        nearest = np.argmin(((fg.mean(0) - palette) ** 2).sum(1))
        assert list(COLOURS)[nearest] == colour


def test_shapes_differ_and_vocabulary_covers_captions():
    imgs = [np.asarray(draw_shape(s, (0, 0, 0), 32)) for s in SHAPES]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i].astype(int) - imgs[j]).sum() > 0
    for colour in COLOURS:
        for shape in SHAPES:
            assert set(f"a {colour} {shape}".split()) <= set(CAPTION_WORDS)
    assert parse_caption("A Blue star, please") == ("blue", "star")
    assert parse_caption("nothing here") == (None, None)
