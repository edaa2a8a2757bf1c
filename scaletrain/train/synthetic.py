"""A toy denoiser on generated data (``train.components: synthetic``).

It exercises everything the engine does (ZeRO partitioning, bf16, EMA, checkpoint and
resume, world-size changes) without the model, objective and loader components, and is
small enough for multi-process tests on a CPU. It is not a diffusion model worth sampling.

Data: a fixed set of ``DATASET_SIZE`` samples, sample i generated from (seed, i). The loader
walks a global sample index: at each batch, rank r of W takes indices
``position + r*B .. position + (r+1)*B`` and the position advances by W*B. The state is the
position alone, so it is the same on every rank and valid at any world size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from scaletrain.train.components import Components

DATASET_SIZE = 64
SPATIAL = 8
POOLED_DIM = 16


class ToyDenoiser(nn.Module):
    """MLP eps-predictor: flattened latent + timestep embedding + pooled text vector."""

    def __init__(self, channels: int, width: int, depth: int = 4) -> None:
        super().__init__()
        self.dim = channels * SPATIAL * SPATIAL
        self.inp = nn.Linear(self.dim + 2 + POOLED_DIM, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, self.dim)
        # A per-sample gain on the noisy input: the ideal eps-predictor off the data line is
        # x_t / sigma(t), which a narrow MLP alone could not represent.
        self.gain = nn.Linear(width, 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, pooled: torch.Tensor):
        dtype = self.inp.weight.dtype
        b = sample.shape[0]
        t = timestep.view(b, 1) * (math.pi / 2)
        x = torch.cat([sample.reshape(b, -1), t.sin(), t.cos(), pooled], dim=1).to(dtype)
        h = torch.nn.functional.silu(self.inp(x))
        for layer in self.hidden:
            h = h + torch.nn.functional.silu(layer(h))
        out = self.out(h) + self.gain(h) * x[:, : self.dim]
        return out.reshape(sample.shape)


def _direction(seed: int, channels: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)
    v = torch.randn(channels, SPATIAL, SPATIAL, generator=g)
    return v / v.norm() * v.numel() ** 0.5


def _sample(seed: int, index: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents lie on one line (c * v): the noise off that line is recoverable from the noisy
    input, so a denoiser can drive the loss well below its starting value of about 1."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index % DATASET_SIZE)
    scale = torch.randn((), generator=g)
    pooled = torch.randn(POOLED_DIM, generator=g)
    return scale * _direction(seed, channels), pooled


class SyntheticLoader:
    def __init__(self, channels: int, batch_size: int, rank: int, world: int, seed: int,
                 state: dict | None = None) -> None:
        self.channels, self.batch_size = channels, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.position = 0
        self.samples_per_epoch = DATASET_SIZE
        if state is not None:
            self.load_state_dict(state)

    def __iter__(self):
        while True:
            start = self.position + self.rank * self.batch_size
            items = [_sample(self.seed, start + i, self.channels) for i in range(self.batch_size)]
            self.position += self.world * self.batch_size
            yield {
                "latents": torch.stack([a for a, _ in items]),
                "pooled": torch.stack([b for _, b in items]),
                "keys": [str((start + i) % DATASET_SIZE) for i in range(self.batch_size)],
            }

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

    def metrics(self) -> dict[str, float]:
        return {}


def merge_states(states: list[dict[str, int]]) -> dict[str, int]:
    positions = {s["position"] for s in states}
    if len(positions) != 1:
        raise ValueError(f"synthetic loader states disagree: {sorted(positions)}")
    return {"position": positions.pop()}


def eps_objective(model_fn, batch: dict[str, Any], generator: torch.Generator):
    """Variance-preserving eps-prediction with a cosine schedule and uniform t (toy)."""
    x0 = batch["latents"].float()
    b = x0.shape[0]
    t = torch.rand(b, generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    alpha = torch.cos(t * math.pi / 2).view(b, 1, 1, 1)
    sigma = torch.sin(t * math.pi / 2).view(b, 1, 1, 1)
    pred = model_fn(alpha * x0 + sigma * noise, t, batch)
    loss = (pred.float() - noise).pow(2).flatten(1).mean(1)
    return loss, {"timesteps": t}


def synthetic_components(cfg) -> Components:
    channels = cfg.model.in_channels
    width = cfg.train.synthetic_width

    def build_model(device: str) -> nn.Module:
        return ToyDenoiser(channels, width).to(device)

    return Components(
        build_model=build_model,
        init_module=None,
        build_loader=lambda rank, world, seed, state: SyntheticLoader(
            channels, cfg.data.batch_size, rank, world, seed, state
        ),
        merge_loader_states=merge_states,
        build_objective=lambda loader: eps_objective,
        make_model_fn=lambda engine: (
            lambda noisy, t, batch: engine(noisy, t, batch["pooled"])
        ),
        # Matmuls only: 2 FLOPs per weight per sample.
        forward_flops_per_sample=lambda: 2.0 * sum(
            p.numel() for n, p in ToyDenoiser(channels, width).named_parameters()
            if n.endswith("weight")),
    )
