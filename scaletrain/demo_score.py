"""How the demo scores itself: does each sample's dominant colour match its prompt?

The synthetic dataset draws one shape in a named colour on a white background
(``data_pipeline.synthetic``). A sample follows its prompt when the colour of its foreground
(the pixels that are clearly not background) is nearest, among the named colours, to the
colour the prompt names. This is deliberately simple and needs no model: it scores the
training images themselves at 100%, so a low score means the model, not the scorer, failed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.synthetic import BACKGROUND, COLOURS, parse_caption

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
