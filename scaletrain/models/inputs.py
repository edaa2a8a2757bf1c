"""Random model inputs of the right shapes, for FLOP counting, benchmarks and tests."""

from __future__ import annotations

import torch

from scaletrain.models.config import MMDiTConfig, ModelConfig, ToyConfig


def example_inputs(
    cfg: ModelConfig,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> dict:
    """Keyword arguments for ``model(**inputs)`` at the configured resolution and text length.

    U-Net timesteps are integers in [0, schedule_num_timesteps); MMDiT timesteps are SD3's
    1000 * t with t in [0, 1).
    """

    def randn(*shape):
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device="meta", dtype=dtype)
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device)

    def rand(n):
        if torch.device(device).type == "meta":
            return torch.empty(n, device="meta")
        return torch.rand(n, generator=generator).to(device)

    b, size = batch_size, cfg.sample_size
    if isinstance(cfg, ToyConfig):
        return {
            "sample": randn(b, cfg.in_channels, size, size),
            "timestep": rand(b) * 1000.0,
            "pooled_projections": randn(b, cfg.pooled_projection_dim),
        }
    if isinstance(cfg, MMDiTConfig):
        return {
            "hidden_states": randn(b, cfg.in_channels, size, size),
            "encoder_hidden_states": randn(b, cfg.text_seq_len, cfg.joint_attention_dim),
            "pooled_projections": randn(b, cfg.pooled_projection_dim),
            "timestep": rand(b) * 1000.0,
        }
    timestep = (rand(b) * cfg.schedule_num_timesteps).floor()
    pixels = float(size * 8)  # SDXL's micro-conditioning is in pixels (VAE factor 8)
    time_ids = torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * b)
    return {
        "sample": randn(b, cfg.in_channels, size, size),
        "timestep": timestep,
        "encoder_hidden_states": randn(b, cfg.text_seq_len, cfg.cross_attention_dim),
        "added_cond_kwargs": {
            "text_embeds": randn(b, cfg.pooled_projection_dim),
            "time_ids": time_ids.to(device=device, dtype=dtype),
        },
    }
