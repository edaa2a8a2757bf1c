"""Fixtures of the data-pipeline tests: tiny encoders on disk, raw-tar writers, configs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from scaletrain.config import load_config
from scaletrain.data.preprocess.config import PreprocessConfig

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "on", "background"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_clip_path(tiny_dir) -> Path:
    from scaletrain.data.encoders.tiny import save_tiny_clip

    return save_tiny_clip(tiny_dir / "clip_l", WORDS, hidden_size=48, projection_dim=24)


@pytest.fixture(scope="session")
def tiny_t5_path(tiny_dir) -> Path:
    from scaletrain.data.encoders.tiny import save_tiny_t5

    return save_tiny_t5(tiny_dir / "t5", WORDS)


@pytest.fixture(scope="session")
def tiny_open_clip(tiny_dir) -> dict[str, str]:
    from scaletrain.data.encoders.tiny import save_tiny_open_clip

    return save_tiny_open_clip(tiny_dir / "open_clip")


@pytest.fixture(scope="session")
def tiny_vae_path(tiny_dir) -> Path:
    from scaletrain.data.encoders.tiny import save_tiny_vae

    # Three levels: 4x downsampling, 4 latent channels; shift set to test its round trip.
    return save_tiny_vae(tiny_dir / "vae", block_out_channels=(8, 8, 16), shift_factor=0.1)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scaletrain_cache")


@pytest.fixture()
def demo_cfg(tiny_cache) -> PreprocessConfig:
    """The demo preset, in-process decoding, no progress bar, a private model cache."""
    return load_config(
        ROOT / "configs" / "data" / "demo.yaml",
        [
            f"preprocess.text_encoder.tiny.cache_dir={tiny_cache}",
            "preprocess.decode_workers=0",
            "preprocess.progress=false",
            "preprocess.batch_size=8",
        ],
    ).preprocess


def image_bytes(size=(64, 64), colour=(200, 30, 30), fmt="JPEG", mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt, **save)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A raw shard with exactly these members, in this order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def read_latent_shard(path: Path) -> dict[str, tuple[dict, dict, dict]]:
    """key -> (latent, text, meta) of every sample of a latent shard, grouped the way
    WebDataset groups tar members (key = name up to the first dot)."""
    from scaletrain.data.shard_format import decode_sample

    samples: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for member in tf:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(member).read()
    return {key: decode_sample(sample) for key, sample in samples.items()}


# importlib import mode: test modules cannot import this file, so helpers come as fixtures.
@pytest.fixture(name="image_bytes")
def _image_bytes_fixture():
    return image_bytes


@pytest.fixture(name="write_tar")
def _write_tar_fixture():
    return write_tar


@pytest.fixture(name="read_latent_shard")
def _read_latent_shard_fixture():
    return read_latent_shard
