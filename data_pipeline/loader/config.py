"""Config of the training loader over latent shards (issue 6).

See ``docs/data_loader.md`` for what each field changes and for the exactly-once rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config_base import require


@dataclass
class DataConfig:
    """The training loader over latent shards.

    ``batch_size`` is the per-rank micro-batch; the global batch is
    ``batch_size * world_size * grad_accum`` (grad_accum belongs to the train section).
    """

    # Directory of latent shards holding index.json (written by `scaletrain preprocess`).
    path: str = ""
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
    # Added to the run's seed for everything the loader draws (shard order, shuffles, latents).
    seed_offset: int = 0
    # Draw z = mean + std * eps each epoch (Rombach et al. 2022); false uses the mean.
    sample_latents: bool = True
    # Batches each DataLoader worker prepares ahead (DataLoader's prefetch_factor).
    prefetch_factor: int = 2
    # Pin batch memory for faster host-to-GPU copies (only useful with CUDA).
    pin_memory: bool = False
    # Seconds the loader waits for a worker's batch before raising (0: wait forever).
    timeout_s: float = 0.0

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
