"""The root configuration: one section per component, each declared beside its code.

`load_config(path, overrides)` reads a YAML preset (with its ``base:`` files), applies dotted
overrides, and validates everything eagerly. Components receive only their own section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scaletrain.core.config_base import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_yaml,
    require,
)
from scaletrain.data.loader.config import DataConfig
from scaletrain.data.preprocess.config import PreprocessConfig
from scaletrain.diffusion.config import DiffusionConfig
from scaletrain.eval.config import EvalConfig
from scaletrain.launch.config import SlurmConfig
from scaletrain.models.config import ModelConfig, UNetConfig
from scaletrain.train.config import CheckpointConfig, EMAConfig, TrainConfig
from scaletrain.train.monitor.config import LoggingConfig, ValidationConfig

__all__ = ["RootConfig", "ModelConfig", "ConfigError", "load_config"]


@dataclass
class RootConfig:
    """Everything a run needs. Sections map one to one onto components."""

    seed: int = 0
    model: ModelConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        # Seeds reach torch.manual_seed (at most 2**64 - 1) and numpy, with data.seed_offset
        # added; 63 bits leave room for both.
        require(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63), got {self.seed}")
        require(self.seed + self.data.seed_offset < 2**63, "data.seed_offset",
                f"seed + data.seed_offset must be < 2**63, got {self.seed + self.data.seed_offset}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RootConfig:
    """Load ``path`` (or the defaults when None), apply overrides, validate."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return from_dict(RootConfig, data)
