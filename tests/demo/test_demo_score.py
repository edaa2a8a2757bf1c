"""The demo's colour scorer: right on the training images, wrong when colours are swapped."""

import io

import numpy as np
import pytest
from PIL import Image

from scaletrain.data.synthetic import (
    BACKGROUND,
    COLOURS,
    SHAPES,
    caption_for,
    dominant_colour,
    draw_shape,
    score_samples,
)


@pytest.mark.parametrize("colour", sorted(COLOURS))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_training_image_scores_its_own_colour_even_after_jpeg(colour, shape):
    img = draw_shape(shape, COLOURS[colour], 64, (0.5, 0.5), 0.6)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    buf.seek(0)
    assert dominant_colour(Image.open(buf)) == colour


def test_blank_and_noise_images_have_no_dominant_colour():
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    assert dominant_colour(blank) is None
    faint = np.full((64, 64, 3), 235, np.uint8)  # near-white haze, no shape
    assert dominant_colour(faint) is None


def test_score_counts_matches_and_mismatches(tmp_path):
    records = []
    for i, (drawn, prompted) in enumerate([("red", "red"), ("blue", "blue"), ("green", "red")]):
        draw_shape("circle", COLOURS[drawn], 64, (0.5, 0.5), 0.6).save(tmp_path / f"{i}.png")
        records.append({"prompt": caption_for(prompted, "circle"), "file": f"{i}.png"})
    result = score_samples(records, tmp_path)
    assert (result["matched"], result["total"]) == (2, 3)
    assert result["score"] == pytest.approx(2 / 3)
    assert [d["found"] for d in result["details"]] == ["red", "blue", "green"]
