"""Generated training data (``data.synthetic.enabled: true``): no shards, no encoders.

It feeds the toy model (``model.arch: toy``) so that the engine (ZeRO partitioning, bf16, EMA,
checkpoint and resume, world-size changes, non-finite steps) can be tested and benchmarked on
its own, on a CPU. Batches carry ``latents`` and ``pooled`` (no token states).

Data: a fixed set of ``samples`` samples, sample i generated from (seed, i). The loader walks
a global sample index: at each batch, rank r of W takes indices ``position + r*B ..
position + (r+1)*B`` and the position advances by W*B. The state is the position alone, the
same on every rank and valid at any world size, so it is saved as a ``global`` state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from scaletrain.data.loader.config import SyntheticDataConfig

STATE_FORMAT = "scaletrain.synthetic_loader.v1"


def _direction(seed: int, cfg: SyntheticDataConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)
    v = torch.randn(cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    return v / v.norm() * v.numel() ** 0.5


def synthetic_sample(seed: int, index: int, cfg: SyntheticDataConfig
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent, pooled) of sample ``index``. Latents lie on one line (c * v): the noise off
    that line is recoverable from the noisy input, so a denoiser can learn it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index % cfg.samples)
    scale = torch.randn((), generator=g)
    pooled = torch.randn(cfg.pooled_dim, generator=g)
    return scale * _direction(seed, cfg), pooled


class SyntheticLoader:
    """The loader protocol of :class:`~scaletrain.data.loader.train_loader.TrainLoader` over
    generated samples."""

    info = None  # no dataset index: latents are not scaled and there are no encoders

    def __init__(self, cfg: SyntheticDataConfig, batch_size: int, rank: int, world_size: int,
                 seed: int) -> None:
        self.cfg, self.batch_size = cfg, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.position = 0

    @property
    def samples_per_epoch(self) -> int:
        return self.cfg.samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            batch_number = self.position // (self.world_size * self.batch_size)
            start = self.position + self.rank * self.batch_size
            items = [synthetic_sample(self.seed, start + i, self.cfg)
                     for i in range(self.batch_size)]
            self.position += self.world_size * self.batch_size
            latents = torch.stack([a for a, _ in items])
            if self.rank == self.cfg.nan_rank and batch_number in self.cfg.nan_batches:
                latents = latents * float("nan")  # fault injection (data.synthetic.nan_batches)
            yield {
                "latents": latents,
                "pooled": torch.stack([b for _, b in items]),
                "keys": [str((start + i) % self.cfg.samples) for i in range(self.batch_size)],
            }

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "kind": "global", "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a synthetic loader state: {state.get('format')!r}")
        self.position = int(state["position"])

    def metrics(self) -> dict[str, int]:
        return {}

    def empty_conditioning(self) -> None:
        return None

    def close(self) -> None:
        pass
