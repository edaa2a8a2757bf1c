"""Image and text encoders, built from the ``preprocess`` config section.

Preprocessing encodes with them; the sampler reuses the same factories to encode prompts
(``build_text_encoder(cfg).encode([...])``) and to turn latents back into pixels
(``build_image_encoder(cfg).decode(image_encoder.unscale(z))``).

The model libraries are imported where a model of theirs is built, not at the top of these
modules: open_clip adds ~6 s, diffusers ~4 s and transformers ~1.5 s to a process's start-up
on a 2-core machine (measured over `python -c "import torch; import X"`), and every training
rank imports this package (validation) though most runs use one family of encoders or none.
"""

from __future__ import annotations

import torch

from scaletrain.data.encoders.image import ImageEncoder, PixelEncoder, VAEEncoder
from scaletrain.data.encoders.text import TextEncoder, unbatch_text

__all__ = [
    "ImageEncoder",
    "PixelEncoder",
    "VAEEncoder",
    "TextEncoder",
    "build_image_encoder",
    "build_text_encoder",
    "unbatch_text",
]


def _section(cfg, name: str):
    """Accept the whole PreprocessConfig or just its encoder section."""
    return getattr(cfg, name) if hasattr(cfg, name) else cfg


def build_image_encoder(cfg, device: str | torch.device | None = None) -> ImageEncoder:
    """The image encoder of ``cfg`` (a PreprocessConfig or an ImageEncoderConfig).

    ``device`` defaults to the PreprocessConfig's ``device`` when given one, else "auto".
    """
    device = device or getattr(cfg, "device", "auto")
    enc = _section(cfg, "image_encoder")
    if enc.kind == "pixel":
        return PixelEncoder(factor=enc.factor, dtype=enc.dtype)
    if enc.kind == "vae":
        return VAEEncoder(
            enc.name,
            subfolder=enc.subfolder,
            dtype=enc.dtype,
            compute_dtype=enc.compute_dtype,
            scaling_factor=enc.scaling_factor,
            shift_factor=enc.shift_factor,
            device=device,
        )
    raise ValueError(f"unknown image encoder kind {enc.kind!r}")


def build_text_encoder(cfg, device: str | torch.device | None = None) -> TextEncoder:
    """The text encoder of ``cfg`` (a PreprocessConfig or a TextEncoderConfig)."""
    device = device or getattr(cfg, "device", "auto")
    return TextEncoder(_section(cfg, "text_encoder"), device=device)
