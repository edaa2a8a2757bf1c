"""Configs of training-time monitoring: metrics/wandb logging and validation sampling."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config_base import require


@dataclass
class LoggingConfig:
    every: int = 10
    wandb: bool = True
    wandb_project: str = "scaletrain"

    def __post_init__(self) -> None:
        require(self.every > 0, "every", f"must be > 0, got {self.every}")


@dataclass
class ValidationConfig:
    every: int = 0

    def __post_init__(self) -> None:
        require(self.every >= 0, "every", f"must be >= 0, got {self.every}")
