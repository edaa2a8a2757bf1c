"""Diffusion objective, schedule and sampler config. Owned by issue 4."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from scaletrain.config_base import require


@dataclass
class DiffusionConfig:
    objective: Literal["eps", "v", "x0", "flow"] = "eps"
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        require(self.num_train_timesteps > 1, "num_train_timesteps", "must be > 1")
