"""A toy denoiser (``model.arch: toy``): an MLP over the flattened latent.

It exercises everything the engine does (ZeRO partitioning, bf16, EMA, checkpoint and
resume, world-size changes) with a model small enough for multi-process tests on a CPU. Its
forward takes diffusers-style names like the real models: ``forward(sample, timestep,
pooled_projections)``. It is not a diffusion model worth sampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.models.config import ToyConfig


class ToyDenoiser(nn.Module):
    """Flattened latent + timestep features + pooled text vector -> a latent-shaped output."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.dim = cfg.in_channels * cfg.sample_size * cfg.sample_size
        self.inp = nn.Linear(self.dim + 2 + cfg.pooled_projection_dim, cfg.width)
        self.hidden = nn.ModuleList(nn.Linear(cfg.width, cfg.width) for _ in range(cfg.depth - 1))
        self.out = nn.Linear(cfg.width, self.dim)
        # A per-sample gain on the noisy input: the ideal eps-predictor off the data line is
        # x_t / sigma(t), which a narrow MLP alone could not represent.
        self.gain = nn.Linear(cfg.width, 1)

    def blocks(self) -> list[nn.Module]:
        """The units of regional compilation (train.compile: blocks): the hidden layers."""
        return list(self.hidden)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
        dtype = self.inp.weight.dtype
        b = sample.shape[0]
        # Timesteps follow the diffusers convention, [0, 1000) for every objective.
        t = timestep.float().view(b, 1) * (math.pi / 2 / 1000.0)
        x = torch.cat([sample.reshape(b, -1).float(), t.sin(), t.cos(),
                       pooled_projections.float()], dim=1).to(dtype)
        h = F.silu(self.inp(x))
        for layer in self.hidden:
            h = h + F.silu(layer(h))
        out = self.out(h) + self.gain(h) * x[:, : self.dim]
        return out.reshape(sample.shape)
