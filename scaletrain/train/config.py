"""Configs of the training engine (issue 7): optimisation, EMA, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from scaletrain.config_base import require


@dataclass
class TrainConfig:
    max_steps: int = 1000
    lr: float = 1e-4
    zero_stage: Literal[0, 1, 2, 3] = 2

    def __post_init__(self) -> None:
        require(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999

    def __post_init__(self) -> None:
        require(0.0 <= self.decay < 1.0, "decay", f"must be in [0, 1), got {self.decay}")


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep_last: int = 3

    def __post_init__(self) -> None:
        require(self.every > 0, "every", f"must be > 0, got {self.every}")
        require(self.keep_last > 0, "keep_last", f"must be > 0, got {self.keep_last}")
