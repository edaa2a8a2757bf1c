"""Config of the training loader over latent shards (issue 6)."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config_base import require


@dataclass
class DataConfig:
    """The training loader over latent shards."""

    path: str = ""
    batch_size: int = 8
    num_workers: int = 2

    def __post_init__(self) -> None:
        require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
