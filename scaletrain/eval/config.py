"""Config of evaluation: held-out validation loss, FID and CLIP score (``eval.*``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from scaletrain.core.config_base import require

METRICS = ("loss", "fid", "clip")
# pytorch-fid's Inception blocks: 2048 is the standard FID (pool3); the others are cheaper
# features for quick checks, never comparable with published numbers.
FID_DIMS = (64, 192, 768, 2048)


@dataclass
class EvalConfig:
    """Validation loss on held-out latents, FID and CLIP score of samples of the EMA weights.

    Training evaluates every ``every`` steps on every rank (each takes its share of the work);
    ``scaletrain eval`` computes the same on an export or a checkpoint.
    """

    # Evaluate every N optimizer steps during training; 0 disables evaluation in training.
    every: int = 0
    # Which metrics: loss (held-out validation loss), fid, clip (CLIP score).
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    # The held-out set: a directory of latent shards written by `scaletrain preprocess`.
    # Set this or holdout_shards.
    data: str = ""
    # Hold out the last N shards of data.path instead: training never reads them.
    holdout_shards: int = 0
    # ---- validation loss (the MLPerf text-to-image protocol)
    # Held-out samples in the loss (the first ones in shard and stored order); 0: all.
    loss_samples: int = 512
    # Evenly spaced process times t_k = (k + 0.5) / N (1 the noisiest) at which each held-out
    # sample's loss is computed, with fixed noise and no CFG dropout.
    timesteps: int = 8
    # Seed of the fixed noise of the loss and of the generated images' seeds (seed + i).
    seed: int = 0
    # Samples per model call (loss, generation, feature extraction); bounds the memory.
    batch_size: int = 8
    # ---- generated samples (FID and CLIP score)
    # Images generated from the EMA weights per evaluation (split over all ranks).
    num_samples: int = 1000
    # A text file of prompts (one a line, '#' comments); empty: the held-out set's captions.
    # Image i takes prompt i mod len(prompts) and seed `seed + i`.
    prompts: str = ""
    # Sampler name; empty: diffusion.sampler's default.
    sampler: str = ""
    # Sampler steps; 0: diffusion.sample_steps.
    steps: int = 0
    # Classifier-free guidance scale; 0: diffusion.guidance_scale (1.0 turns guidance off).
    guidance_scale: float = 0.0
    # ---- FID (Heusel et al. 2017) with pytorch-fid's Inception-v3
    # pytorch-fid's Inception weights file (pt_inception-2015-12-05-6726825d.pth); null:
    # pytorch-fid's URL through the torch hub cache (fails clearly when offline).
    inception: str | None = None
    # Inception feature width: 2048 (pool3, the standard FID), or 64/192/768 for quick checks.
    fid_dims: int = 2048
    # Reference images: an image folder or a raw shard pattern ('raw/{00000..00009}.tar');
    # empty: the held-out latents decoded by the run's image encoder.
    fid_reference: str = ""
    # Cache of the reference statistics (.npz: mean, covariance, image count, preprocessing);
    # empty: RUN_DIR/eval/fid_reference.npz (training) or OUT/fid_reference.npz (the CLI).
    fid_stats: str = ""
    # ---- CLIP score (Hessel et al. 2021): 100 * max(cos(image, prompt), 0)
    # open_clip: a built-in name with clip_pretrained, 'hf-hub:ORG/REPO' or 'local-dir:PATH';
    # transformers: a hub id or a local directory of CLIPModel.
    clip_model: str = "openai/clip-vit-large-patch14"
    clip_library: Literal["transformers", "open_clip"] = "transformers"
    # open_clip only: a pretrained tag (e.g. openai) or a weights file, for a built-in name.
    clip_pretrained: str = ""

    def __post_init__(self) -> None:
        require(self.every >= 0, "every", f"must be >= 0 (0 disables), got {self.every}")
        unknown = [m for m in self.metrics if m not in METRICS]
        require(not unknown, "metrics", f"unknown {unknown}; allowed: {', '.join(METRICS)}")
        require(len(set(self.metrics)) == len(self.metrics), "metrics", "lists one twice")
        require(self.holdout_shards >= 0, "holdout_shards",
                f"must be >= 0, got {self.holdout_shards}")
        require(not (self.data and self.holdout_shards), "holdout_shards",
                "set eval.data or eval.holdout_shards, not both")
        require(self.loss_samples >= 0, "loss_samples", f"must be >= 0, got {self.loss_samples}")
        require(self.timesteps >= 1, "timesteps", f"must be >= 1, got {self.timesteps}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.num_samples >= 0, "num_samples", f"must be >= 0, got {self.num_samples}")
        require(self.steps >= 0, "steps", f"must be >= 0 (0: the diffusion default), got "
                f"{self.steps}")
        require(self.guidance_scale == 0 or self.guidance_scale >= 1.0, "guidance_scale",
                f"must be >= 1.0, or 0 for the diffusion default; got {self.guidance_scale}")
        require(self.fid_dims in FID_DIMS, "fid_dims",
                f"must be one of {', '.join(map(str, FID_DIMS))}; got {self.fid_dims}")
        if "fid" in self.metrics:
            require(self.num_samples >= 2 or self.num_samples == 0, "num_samples",
                    "FID needs at least 2 samples")
        require(bool(self.clip_model.strip()), "clip_model", "must not be empty")

    @property
    def has_heldout(self) -> bool:
        return bool(self.data) or self.holdout_shards > 0

    @property
    def sample_metrics(self) -> list[str]:
        """The metrics that need generated images (none when num_samples is 0)."""
        return [m for m in self.metrics if m in ("fid", "clip")] if self.num_samples else []

    def unit_timesteps(self) -> list[float]:
        """The fixed process times of the validation loss: midpoints of N equal bins of
        [0, 1], so neither the clean end (t = 0) nor pure noise (t = 1) is sampled."""
        return [(k + 0.5) / self.timesteps for k in range(self.timesteps)]
