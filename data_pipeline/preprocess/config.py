"""Config of the offline preprocessing (issue 5)."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config_base import require


@dataclass
class PreprocessConfig:
    """How raw image-caption shards become latent shards."""

    resolution: int = 1024

    def __post_init__(self) -> None:
        require(self.resolution % 64 == 0, "resolution", "must be a multiple of 64")
