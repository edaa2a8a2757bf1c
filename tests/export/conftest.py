"""Tiny run configs and trained-looking weights for the export tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scaletrain.config import RootConfig
from scaletrain.config_base import apply_overrides, deep_merge, from_dict, load_yaml
from scaletrain.models import build_model

REPO = Path(__file__).resolve().parents[2]


def tiny_root_config(preset: str, overrides=(), cache_dir: str | Path = "") -> RootConfig:
    """configs/models/{preset}.yaml + the demo's encoders (pixel, tiny CLIP) as one RootConfig."""
    data = deep_merge(
        load_yaml(REPO / "configs" / "models" / f"{preset}.yaml"),
        load_yaml(REPO / "configs" / "data" / "demo.yaml"),
    )
    extra = ["data.max_text_tokens=32"]
    if cache_dir:
        extra.append(f"preprocess.text_encoder.tiny.cache_dir={cache_dir}")
    return from_dict(RootConfig, apply_overrides(data, [*extra, *overrides]))


def trained_like(model_cfg, seed: int = 0) -> torch.nn.Module:
    """The model with every parameter moved off its initial value: zero-initialised gates
    (AdaLN-Zero, zero-init convs) would otherwise make outputs that cannot tell weights apart."""
    torch.manual_seed(seed)
    model = build_model(model_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(autouse=True)
def _one_thread():
    """Several processes share two cores: one intra-op thread each is fast and predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_clip_cache(tmp_path_factory) -> Path:
    """Where the demo's tiny CLIP is built (once per session), instead of ~/.cache."""
    return tmp_path_factory.mktemp("tiny_clip_cache")
