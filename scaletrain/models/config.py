"""Model configs. `arch` is the tag that picks the class in the root config's `model` section.

Owned by the models component (issue 3); extend the fields here beside the code they configure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from scaletrain.config_base import require


@dataclass
class UNetConfig:
    """SDXL-style U-Net."""

    arch: Literal["unet"] = "unet"
    in_channels: int = 4
    sample_size: int = 128

    def __post_init__(self) -> None:
        require(self.in_channels > 0, "in_channels", f"must be > 0, got {self.in_channels}")


@dataclass
class MMDiTConfig:
    """SD3-style MMDiT, sized by depth d: hidden 64*d, d heads."""

    arch: Literal["mmdit"] = "mmdit"
    depth: int = 24
    in_channels: int = 16
    sample_size: int = 128

    def __post_init__(self) -> None:
        require(self.depth > 0, "depth", f"must be > 0, got {self.depth}")
