"""CLIP score against a direct computation with each library's own API, on tiny CLIPs built
and saved the way the real ones are published (open_clip's local-dir layout, transformers'
save_pretrained)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from scaletrain.eval.clip_score import ClipScorer
from tests.support.eval_kit import tiny_transformers_clip

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def _images(folders):
    return [Image.open(p).convert("RGB") for p in sorted(folders[0].glob("*.png"))[:4]]


def test_open_clip_score_equals_a_direct_open_clip_computation(folders, open_clip_dir):
    import open_clip

    images = _images(folders)
    scorer = ClipScorer(f"local-dir:{open_clip_dir}", "open_clip")
    ours = scorer.scores(images, PROMPTS)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        text = model.encode_text(tokenizer(PROMPTS), normalize=True)
    cos = (image * text).sum(-1).double()
    expected = 100 * cos.clamp(min=0)
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-4)
    # The tiny random CLIP gives both signs: the max(cos, 0) of Hessel et al. is exercised.
    assert (cos > 0).any()
    np.testing.assert_allclose(float(ours.mean()), float(expected.mean()), rtol=1e-3)


def test_transformers_score_equals_a_direct_transformers_computation(folders, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    path = tiny_transformers_clip(tmp_path / "clip")
    images = _images(folders)
    ours = ClipScorer(str(path), "transformers").scores(images, PROMPTS)

    model, processor = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    inputs = processor(text=PROMPTS, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    image = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    text = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    expected = 100 * (image * text).sum(-1).double().clamp(min=0)
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-4)


def test_missing_model_fails_clearly(tmp_path):
    with pytest.raises(OSError, match="cannot load transformers CLIPModel"):
        ClipScorer(str(tmp_path / "nothing"), "transformers")
    with pytest.raises(OSError, match="cannot load open_clip CLIP"):
        ClipScorer(f"local-dir:{tmp_path / 'nothing'}", "open_clip")
