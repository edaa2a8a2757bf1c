"""Fixtures of the evaluation tests: random Inception weights in pytorch-fid's file format,
tiny CLIPs saved the way the real ones are, small image folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.data.encoders.tiny import save_tiny_open_clip
from tests.support.eval_kit import INCEPTION_FILE, image_folder, random_inception_weights


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """pytorch-fid's Inception, random weights, as torch hub caches the real file:
    TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth."""
    home = tmp_path_factory.mktemp("torch_home")
    return random_inception_weights(home / "hub" / "checkpoints" / INCEPTION_FILE)


@pytest.fixture(scope="session")
def open_clip_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))["local_dir"])


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two sets of 6 structured 32x32 PNGs, the second with shifted colours."""
    root = tmp_path_factory.mktemp("images")
    return (image_folder(root / "real", 6, seed=0),
            image_folder(root / "fake", 6, seed=1, tint=0.15))
