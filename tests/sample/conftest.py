"""Tiny exports with the demo's encoders (pixel + tiny CLIP) for the sampling tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.export.writer import export_state_dict
from tests.support.tiny import tiny_root_config, trained_like


def write_export(out: Path, preset: str, cache_dir: Path, overrides=(), layout="safetensors",
                 seed: int = 0) -> Path:
    """An export of a randomly initialised model whose parameters are all perturbed."""
    cfg = tiny_root_config(preset, overrides, cache_dir)
    export_state_dict(trained_like(cfg.model, seed).state_dict(), cfg, out, layout=layout,
                      weights="raw")
    return out


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
