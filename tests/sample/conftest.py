"""Tiny exports with the demo's encoders (pixel + tiny CLIP) for the sampling tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scaletrain.config import RootConfig
from scaletrain.config_base import apply_overrides, deep_merge, from_dict, load_yaml
from scaletrain.export import export_state_dict
from scaletrain.models import build_model

REPO = Path(__file__).resolve().parents[2]


def tiny_root_config(preset: str, overrides=(), cache_dir: str | Path = "") -> RootConfig:
    """configs/models/{preset}.yaml + configs/data/demo.yaml as one RootConfig."""
    data = deep_merge(
        load_yaml(REPO / "configs" / "models" / f"{preset}.yaml"),
        load_yaml(REPO / "configs" / "data" / "demo.yaml"),
    )
    extra = ["data.max_text_tokens=32", f"preprocess.text_encoder.tiny.cache_dir={cache_dir}"]
    return from_dict(RootConfig, apply_overrides(data, [*extra, *overrides]))


def write_export(out: Path, preset: str, cache_dir: Path, overrides=(), layout="safetensors",
                 seed: int = 0) -> Path:
    """An export of a randomly initialised model whose parameters are all perturbed (so the
    zero-initialised gates do not hide the conditioning)."""
    cfg = tiny_root_config(preset, overrides, cache_dir)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_state_dict(model.state_dict(), cfg, out, layout=layout, weights="raw")
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_clip_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_clip_cache")


@pytest.fixture(scope="session")
def unet_export(tmp_path_factory, tiny_clip_cache) -> Path:
    """A tiny U-Net (eps, DDIM by default) export, classifier-free guidance with zeros."""
    return write_export(tmp_path_factory.mktemp("unet") / "export", "tiny_unet", tiny_clip_cache)


@pytest.fixture(scope="session")
def mmdit_export(tmp_path_factory, tiny_clip_cache) -> Path:
    """A tiny rectified-flow MMDiT export whose CFG baseline is the empty prompt."""
    return write_export(
        tmp_path_factory.mktemp("mmdit") / "export", "tiny_mmdit", tiny_clip_cache,
        ["diffusion.objective=flow", "diffusion.cfg_null=empty_prompt"],
    )
