"""The synthetic demo dataset: one coloured shape on a plain background per image.

Captions name the colour and the shape ("a red circle"), so a model trained for a few
minutes can be checked by eye and by a scorer: the demo reuses :data:`COLOURS` to measure
whether a sample's dominant foreground colour matches its prompt
(:func:`parse_caption` recovers colour and shape from a caption).

Shards are written in img2dataset's layout (``{key}.jpg``, ``{key}.txt``, ``{key}.json`` in
``.tar`` files named ``00000.tar``, ...), so the demo runs the same preprocessing as real
data. Everything is a function of the seed: the same call writes the same bytes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from scaletrain.core.files import atomic_output

# Colour name -> RGB. Far apart in RGB, and none close to the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "cyan": (40, 200, 210),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
BACKGROUND_NAME = "white"
# Every word a caption can contain (the demo's tiny tokenizer has each as one token).
CAPTION_WORDS: tuple[str, ...] = tuple(
    sorted({"a", "an", "on", BACKGROUND_NAME, "background", *COLOURS, *SHAPES})
)
# Shapes are drawn this many times larger, then downsampled: smooth, anti-aliased edges.
_SUPERSAMPLE = 4


def caption_for(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def parse_caption(caption: str) -> tuple[str | None, str | None]:
    """(colour, shape) named in a caption, or None for each that it does not name."""
    words = caption.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


def draw_shape(
    shape: str,
    colour: tuple[int, int, int],
    size: int,
    center: tuple[float, float] = (0.5, 0.5),
    scale: float = 0.6,
    background: tuple[int, int, int] = BACKGROUND,
) -> Image.Image:
    """A ``size`` x ``size`` RGB image of one filled shape. ``center`` is (x, y) and
    ``scale`` the shape's extent, both as fractions of the side."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    cx, cy, r = center[0] * big, center[1] * big, scale * big / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        s = r * 0.85  # same visual weight as the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in _angles(3, -math.pi / 2)]
        draw.polygon(pts, fill=colour)
    elif shape == "diamond":
        draw.polygon(
            [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=colour
        )
    elif shape == "star":
        pts = []
        for i, a in enumerate(_angles(10, -math.pi / 2)):
            radius = r if i % 2 == 0 else r * 0.5
            pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        draw.polygon(pts, fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _angles(n: int, start: float) -> list[float]:
    return [start + 2 * math.pi * i / n for i in range(n)]


def sample_spec(seed: int, shard: int, index: int) -> dict:
    """The colour, shape and placement of one sample: a pure function of its position."""
    rng = np.random.default_rng([seed, shard, index])
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    scale = float(rng.uniform(0.55, 0.85))
    margin = scale / 2 + 0.01
    center = (float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 1 - margin)))
    return {"colour": colour, "shape": shape, "scale": scale, "center": center}


def sample_key(shard: int, index: int, index_digits: int = 4) -> str:
    """img2dataset's key: shard number (5 digits) then index in the shard."""
    return f"{shard:05d}{index:0{index_digits}d}"


def write_synthetic_shards(
    out_dir: str | Path,
    num_shards: int,
    samples_per_shard: int,
    size: int = 64,
    seed: int = 0,
    image_format: str = "jpg",
) -> str:
    """Write ``num_shards`` raw shards of ``samples_per_shard`` samples each into
    ``out_dir`` and return their brace pattern, e.g. ``out/{00000..00003}.tar``."""
    if num_shards < 1 or samples_per_shard < 1:
        raise ValueError("need at least one shard and one sample per shard")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(samples_per_shard - 1)))
    for shard in range(num_shards):
        path = out_dir / f"{shard:05d}.tar"
        # mtime fixed (an int: a float mtime costs an extra pax header per file): the same
        # seed gives byte-identical shards.
        with atomic_output(path) as tmp, wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:
            for index in range(samples_per_shard):
                spec = sample_spec(seed, shard, index)
                key = sample_key(shard, index, digits)
                img = draw_shape(
                    spec["shape"], COLOURS[spec["colour"]], size, spec["center"], spec["scale"]
                )
                buf = io.BytesIO()
                if image_format == "jpg":
                    img.save(buf, format="JPEG", quality=95)
                else:
                    img.save(buf, format="PNG")
                caption = caption_for(spec["colour"], spec["shape"])
                meta = {
                    "key": key,
                    "caption": caption,
                    "url": f"synthetic://{seed}/{shard}/{index}",
                    "status": "success",
                    "error_message": None,
                    "width": size,
                    "height": size,
                    "original_width": size,
                    "original_height": size,
                    "exif": None,
                    **spec,
                }
                sink.write(
                    {
                        "__key__": key,
                        image_format: buf.getvalue(),
                        "txt": caption.encode("utf-8"),
                        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                    }
                )
    return f"{out_dir}/{{00000..{num_shards - 1:05d}}}.tar"


# --------------------------------------------------------------------------- scoring
# How the demo scores itself: does each sample's dominant colour match its prompt? A sample
# follows its prompt when the colour of its foreground (the pixels that are clearly not
# background) is nearest, among the named colours, to the colour the prompt names. This is
# deliberately simple and needs no model: it scores the training images themselves at 100%,
# so a low score means the model, not the scorer, failed.

# A pixel is foreground when it is this far (RGB L2) from the background; JPEG ringing and
# anti-aliased edges stay below it.
FOREGROUND_DISTANCE = 80.0
# Fewer foreground pixels than this share of the image means "no shape was drawn".
MIN_FOREGROUND_SHARE = 0.02


def dominant_colour(image: Image.Image | np.ndarray) -> str | None:
    """Name of the named colour nearest to the median foreground pixel, or None."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    pixels = pixels.reshape(-1, 3).astype(np.float32)
    distance = np.linalg.norm(pixels - np.asarray(BACKGROUND, np.float32), axis=1)
    foreground = pixels[distance > FOREGROUND_DISTANCE]
    if len(foreground) < MIN_FOREGROUND_SHARE * len(pixels):
        return None
    # The median is robust to the edge pixels blended with the background.
    centre = np.median(foreground, axis=0)
    names = list(COLOURS)
    table = np.asarray([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(table - centre, axis=1)))]


def score_samples(records: Iterable[dict], base_dir: str | Path = ".") -> dict:
    """Score records of {"prompt", "file"}; returns the share that match and the details."""
    details = []
    for record in records:
        wanted, _shape = parse_caption(record["prompt"])
        path = Path(base_dir) / record["file"]
        with Image.open(path) as img:
            got = dominant_colour(img)
        details.append({**record, "expected": wanted, "found": got, "match": got == wanted})
    matched = sum(d["match"] for d in details)
    return {
        "score": matched / len(details) if details else 0.0,
        "matched": matched,
        "total": len(details),
        "details": details,
    }
