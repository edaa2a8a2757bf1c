"""SLURM submission config (issue 8). Command-line flags of `scaletrain submit` override it."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config_base import require


@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    partition: str = ""
    time_min: int = 240

    def __post_init__(self) -> None:
        require(self.nodes > 0, "nodes", f"must be > 0, got {self.nodes}")
        require(self.gpus_per_node >= 0, "gpus_per_node", "must be >= 0")
