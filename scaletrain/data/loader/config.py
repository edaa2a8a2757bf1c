"""Config of the training loader over latent shards (issue 6).

See ``docs/data_loader.md`` for what each field changes and for the exactly-once rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from scaletrain.core.config_base import ConfigError, require
from scaletrain.data.storage import StorageConfig, check_url


@dataclass
class SyntheticDataConfig:
    """Generated tensors instead of latent shards (``scaletrain/data/loader/synthetic.py``).

    For engine tests and benchmarks with ``model.arch: toy``: no shards, no encoders. Sample i
    is a function of (seed, i mod samples); the latents lie on one line through the origin,
    so a denoiser can drive the loss well below its starting value."""

    enabled: bool = False
    samples: int = 64  # dataset size (one epoch)
    latent_channels: int = 4
    latent_size: int = 8  # latent height and width
    pooled_dim: int = 16  # width of the pooled text vector ("pooled" in the batch)
    # Fault injection: on rank `nan_rank`, the batches with these 0-based global batch numbers
    # (= optimizer step index when train.grad_accum is 1) carry NaN latents.
    nan_batches: list[int] = field(default_factory=list)
    nan_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("samples", "latent_channels", "latent_size", "pooled_dim"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(all(b >= 0 for b in self.nan_batches), "nan_batches", "must be >= 0")
        require(self.nan_rank >= 0, "nan_rank", f"must be >= 0, got {self.nan_rank}")


@dataclass
class SourceConfig:
    """One dataset of a mixture (``data.sources``)."""

    # Directory or URL prefix (s3://bucket/prefix) of latent shards holding index.json.
    path: str = ""
    # Share of batches drawn from this source, relative to the other sources' weights.
    weight: float = 1.0
    # Name in metrics and in the loader's state; "" uses the last component of `path`. Keep
    # it when the path moves: progress is matched by name on resume.
    name: str = ""

    def __post_init__(self) -> None:
        require(bool(self.path), "path", "required: a directory or URL of latent shards")
        require(self.weight > 0, "weight", f"must be > 0, got {self.weight}")
        check_url(self.path, "path")
        if not self.name:
            self.name = self.path.rstrip("/").rsplit("/", 1)[-1] or self.path


@dataclass
class DataConfig:
    """The training loader over latent shards.

    ``batch_size`` is the per-rank micro-batch; the global batch is
    ``batch_size * world_size * grad_accum`` (grad_accum belongs to the train section).
    """

    # Directory or URL prefix (s3://bucket/prefix) of latent shards holding index.json, as
    # written by `scaletrain preprocess`. One source; `sources` names several.
    path: str = ""
    # A mixture: [{path, weight, name}, ...], batches drawn in proportion to the weights.
    # Give `path` or `sources`, not both.
    sources: list[SourceConfig] = field(default_factory=list)
    # Shards found in a source on resume that its checkpoint did not know: read from the
    # source's next epoch (next_epoch), or already in the epoch in progress (now).
    join_new_shards: Literal["next_epoch", "now"] = "next_epoch"
    # Shards the checkpoint read that are gone on resume: logged with their sample counts and
    # training goes on (warn), or the run stops naming them (error).
    missing_shards: Literal["warn", "error"] = "warn"
    # Per-rank micro-batch size; every batch holds exactly this many samples of one bucket.
    batch_size: int = 8
    # DataLoader worker processes per rank; 0 reads in the training process itself.
    num_workers: int = 2
    # Samples held by the seeded shuffle inside each shard. A value >= the shard size gives a
    # uniform permutation of the shard; 0 or 1 keeps the stored order. Memory per worker is
    # about shuffle_buffer samples in their stored dtype.
    shuffle_buffer: int = 512
    # Text tokens per sample after padding: encoder_hidden_states is (B, max_text_tokens, D).
    # SD3-style data puts CLIP then T5 tokens in it, so it needs room for both (77 + 256).
    max_text_tokens: int = 77
    # Added to the run's seed for everything the loader draws (shard order, shuffles).
    seed_offset: int = 0
    # Draw z = mean + std * eps (in the training step, on its device; Rombach et al. 2022)
    # each time a sample is seen; false uses the mean.
    sample_latents: bool = True
    # Batches each DataLoader worker prepares ahead (DataLoader's prefetch_factor).
    prefetch_factor: int = 2
    # Pin batch memory for faster host-to-GPU copies (only useful with CUDA).
    pin_memory: bool = False
    # Seconds the loader waits for a worker's batch before raising (0: wait forever).
    timeout_s: float = 0.0
    # How shards in object storage are reached (endpoint, region, profile, read-ahead,
    # retries); also used by `scaletrain preprocess` for its input and output.
    storage: StorageConfig = field(default_factory=StorageConfig)
    # Generated tensors instead of shards at `path` (engine tests and benchmarks).
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def __post_init__(self) -> None:
        require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(
            self.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}"
        )
        require(
            self.max_text_tokens > 0,
            "max_text_tokens",
            f"must be > 0, got {self.max_text_tokens}",
        )
        require(self.seed_offset >= 0, "seed_offset", f"must be >= 0, got {self.seed_offset}")
        require(
            self.prefetch_factor >= 1,
            "prefetch_factor",
            f"must be >= 1, got {self.prefetch_factor}",
        )
        require(self.timeout_s >= 0, "timeout_s", f"must be >= 0, got {self.timeout_s}")
        require(not (self.path and self.sources), "sources",
                "give data.path (one source) or data.sources (a mixture), not both")
        check_url(self.path, "path")
        names = [s.name for s in self.sources]
        for i, name in enumerate(names):
            require(names.index(name) == i, f"sources[{i}].name",
                    f"{name!r} is the name of sources[{names.index(name)}] too; names must "
                    "differ (they key the progress and the metrics)")

    def resolved_sources(self) -> list[tuple[str, SourceConfig]]:
        """(dotted key, source) of every source: ``data.path`` as one source of weight 1."""
        if self.sources:
            return [(f"data.sources[{i}]", s) for i, s in enumerate(self.sources)]
        if not self.path:
            raise ConfigError("data.path: required: the directory or URL of latent shards (with "
                              "index.json), or data.sources for a mixture")
        return [("data", SourceConfig(path=self.path))]
