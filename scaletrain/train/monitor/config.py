"""Configs of training-time monitoring: metrics/wandb logging and validation sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from scaletrain.core.config_base import require

WandbMode = Literal["online", "offline", "disabled"]


@dataclass
class LoggingConfig:
    """What the loop logs, how often, and where (local JSONL and wandb)."""

    # Log scalar metrics every `every` optimizer steps.
    every: int = 10
    # Also append every logged dict as one JSON line to run_dir/metrics.jsonl (rank 0).
    jsonl: bool = True
    # "offline" by default: it never blocks on a login or a network, and `wandb sync` uploads
    # later. Clusters with internet set "online". The WANDB_MODE environment variable, when
    # set, wins over this field (the usual switch on compute nodes without internet).
    wandb_mode: WandbMode = "offline"
    # wandb project the run is logged to.
    wandb_project: str = "scaletrain"
    # wandb team or user; None uses the logged-in user's default entity.
    wandb_entity: str | None = None
    # Display name of the wandb run; None uses the run directory's name.
    run_name: str | None = None
    # Tags attached to the wandb run.
    wandb_tags: list[str] = field(default_factory=list)
    # Peak dense bf16 TFLOP/s of one device, for MFU. None looks the device name up in
    # scaletrain.train.monitor.throughput.PEAK_TFLOPS (CUDA) or reports no MFU (CPU).
    peak_tflops: float | None = None
    # Number of equal-width buckets of the normalised timestep t in [0, 1] for loss_t/*.
    loss_buckets: int = 10
    # Collect the model's stability diagnostics (skip ratios per U-Net level, residual
    # update norms and the largest attention logit of MMDiT blocks) every N steps; 0: never.
    # They cost extra reductions in forward and backward, so keep this sparse.
    diagnostics_every: int = 0

    def __post_init__(self) -> None:
        require(self.every > 0, "every", f"must be > 0, got {self.every}")
        require(bool(self.wandb_project.strip()), "wandb_project", "must not be empty")
        require(
            self.peak_tflops is None or self.peak_tflops > 0,
            "peak_tflops",
            f"must be > 0 or null, got {self.peak_tflops}",
        )
        require(self.loss_buckets >= 1, "loss_buckets", f"must be >= 1, got {self.loss_buckets}")
        require(
            self.diagnostics_every >= 0,
            "diagnostics_every",
            f"must be >= 0 (0 disables), got {self.diagnostics_every}",
        )


DEFAULT_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red cube on top of a blue sphere",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up photo of a cat's face",
]


@dataclass
class ValidationConfig:
    """Sample fixed prompts with fixed seeds from the EMA weights every `every` steps."""

    # Validate every N optimizer steps; 0 disables validation sampling.
    every: int = 0
    # The fixed prompts sampled at each validation; one image each.
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    # One seed per prompt; empty means seeds 0..len(prompts)-1.
    seeds: list[int] = field(default_factory=list)
    # Sampler name, passed to scaletrain.diffusion.build_sampler.
    sampler: str = "euler"
    # Number of sampler steps (denoising network evaluations without guidance).
    steps: int = 25
    # Classifier-free guidance scale; 1.0 samples the conditional model alone (no uncond pass).
    guidance_scale: float = 4.0
    # Images per row of the PNG grid.
    nrow: int = 4
    # Prompts sampled per model call; bounds the memory validation needs.
    batch_size: int = 8

    def __post_init__(self) -> None:
        require(self.every >= 0, "every", f"must be >= 0 (0 disables), got {self.every}")
        require(len(self.prompts) > 0, "prompts", "must list at least one prompt")
        require(
            not self.seeds or len(self.seeds) == len(self.prompts),
            "seeds",
            f"must be empty or give one seed per prompt ({len(self.prompts)} prompts, "
            f"{len(self.seeds)} seeds)",
        )
        require(all(s >= 0 for s in self.seeds), "seeds", f"must be >= 0, got {self.seeds}")
        require(bool(self.sampler.strip()), "sampler", "must not be empty")
        require(self.steps > 0, "steps", f"must be > 0, got {self.steps}")
        require(
            self.guidance_scale >= 1.0,
            "guidance_scale",
            f"must be >= 1.0 (1.0 disables guidance), got {self.guidance_scale}",
        )
        require(self.nrow > 0, "nrow", f"must be > 0, got {self.nrow}")
        require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")

    def seed_list(self) -> list[int]:
        """The seed of each prompt, in order."""
        return list(self.seeds) if self.seeds else list(range(len(self.prompts)))
