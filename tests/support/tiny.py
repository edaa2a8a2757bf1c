"""Tiny run configs and weights shared by the export, sample and training tests."""

from __future__ import annotations

from pathlib import Path

import torch

from scaletrain.config import RootConfig
from scaletrain.core.config_base import apply_overrides, deep_merge, from_dict, load_yaml
from scaletrain.models import build_model

REPO = Path(__file__).resolve().parents[2]


def tiny_root_config(preset: str, overrides=(), cache_dir: str | Path = "") -> RootConfig:
    """configs/models/{preset}.yaml + the demo's encoders (pixel, tiny CLIP) as one RootConfig;
    the tiny CLIP is built under ``cache_dir`` when given (instead of ~/.cache)."""
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
