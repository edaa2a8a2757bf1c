"""Save a batch of images in [-1, 1] as one PNG grid (PIL; no torchvision dependency)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scaletrain.core.files import atomic_output


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] floats in [-1, 1] -> [N, H, W, 3] uint8 (values outside are clipped)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
    x = images.detach().to(torch.float32).cpu()
    if not torch.isfinite(x).all():
        # Black, not garbage: a diverged model should show as such in the grid.
        x = torch.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """Tile N images into rows of ``nrow``, ``padding`` black pixels between and around."""
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    tiles = images_to_uint8(images)
    n, h, w, _ = tiles.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((padding + rows * (h + padding), padding + cols * (w + padding), 3), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = tile
    return grid


def save_image_grid(
    images: torch.Tensor, path: str | Path, nrow: int = 4, padding: int = 2
) -> Path:
    """Write images [N, 3, H, W] in [-1, 1] as a PNG grid at ``path`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        Image.fromarray(make_grid(images, nrow, padding)).save(tmp, format="PNG")
    return path
