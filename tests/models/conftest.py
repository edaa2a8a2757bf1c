"""Tiny model configs and inputs shared by the model tests (all CPU, all fast)."""

from __future__ import annotations

import pytest
import torch

from scaletrain.models import MMDiTConfig, UNetConfig


def tiny_mmdit_config(**overrides) -> MMDiTConfig:
    base = dict(
        depth=3,
        num_heads=2,
        head_dim=16,
        in_channels=4,
        sample_size=16,
        pos_embed_max_size=24,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        text_seq_len=5,
    )
    return MMDiTConfig(**{**base, **overrides})


def tiny_unet_config(**overrides) -> UNetConfig:
    base = dict(
        in_channels=4,
        sample_size=16,
        block_out_channels=[16, 32, 32],
        layers_per_block=1,
        transformer_layers_per_block=[0, 1, 2],
        attention_head_dim=16,
        cross_attention_dim=24,
        pooled_projection_dim=20,
        addition_time_embed_dim=8,
        norm_num_groups=8,
        text_seq_len=5,
    )
    return UNetConfig(**{**base, **overrides})


@pytest.fixture
def mmdit_cfg():
    """Factory: ``mmdit_cfg(**overrides)`` -> a tiny MMDiTConfig."""
    return tiny_mmdit_config


@pytest.fixture
def unet_cfg():
    """Factory: ``unet_cfg(**overrides)`` -> a tiny UNetConfig (3 levels, no attention at 0)."""
    return tiny_unet_config


@pytest.fixture(autouse=True)
def _seed():
    """Seed every test (tests/conftest.py already runs each on one intra-op thread)."""
    torch.manual_seed(0)


# diffusers' config of stabilityai/stable-diffusion-xl-base-1.0 (unet/config.json).
_SDXL_BASE = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    resnet_time_scale_shift="default",
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)

# diffusers' config of stabilityai/stable-diffusion-3-medium-diffusers (transformer/config.json).
_SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)


@pytest.fixture
def sdxl_base_config() -> dict:
    return dict(_SDXL_BASE)


@pytest.fixture
def sd3_medium_config() -> dict:
    return dict(_SD3_MEDIUM)
