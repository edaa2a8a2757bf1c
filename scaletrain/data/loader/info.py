"""Dataset facts the trainer needs to build its model and objective before the first batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors

from scaletrain.data import storage
from scaletrain.data.loader.batching import BadSample, SampleChecks, SampleSchema, parse_sample
from scaletrain.data.loader.dataset_index import DatasetIndex, load_dataset_index
from scaletrain.data.loader.shard_reader import iter_samples
from scaletrain.data.shard_format import EMPTY_PROMPT_NAME
from scaletrain.data.storage import StorageConfig

# Shards tried for a first readable sample before a dataset is declared unreadable (each
# remote one may take its retries' back-off).
FIRST_SAMPLE_SHARDS = 8


class NoReadableSample(ValueError):
    """None of the first shards of a dataset holds a readable sample."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a latent-shard directory holds (dims from its first readable sample)."""

    path: str
    num_samples: int
    num_shards: int
    bucket_counts: dict[str, int]
    latent_channels: int
    # Pixels per latent cell (8 for the SD VAEs), from the first sample's bucket.
    latent_downsample: int
    latent_dtype: str
    text_dim: int
    pooled_dim: int
    t5_dim: int | None
    scaling_factor: float
    shift_factor: float
    # The text encoders' output for "" (hidden_states, pooled[, t5_hidden_states]), as stored.
    empty_prompt: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def context_dim(self) -> int:
        """Width D of the batch's encoder_hidden_states (SD3: the T5 width)."""
        return max(self.text_dim, self.t5_dim or 0)

    @property
    def schema(self) -> SampleSchema:
        return SampleSchema(self.latent_channels, self.text_dim, self.pooled_dim, self.t5_dim)

    def latent_size(self, bucket: str) -> tuple[int, int]:
        """(h, w) of the latents of a bucket named 'HxW' in pixels."""
        height, width = (int(v) for v in bucket.split("x"))
        return height // self.latent_downsample, width // self.latent_downsample


def declared_latent(index: DatasetIndex) -> tuple[int | None, int | None]:
    """(latent channels, downsampling factor) the index declares (preprocess records its
    image encoder's), None where it does not say."""
    encoder = index.raw.get("image_encoder")
    encoder = encoder if isinstance(encoder, dict) else {}
    values = [encoder.get(k) for k in ("latent_channels", "downsample")]
    return tuple(v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
                 for v in values)


def _first_sample(index: DatasetIndex, cfg: StorageConfig | None):
    """The first sample that passes the checks (and agrees with what the index declares):
    it sets the dims every other sample is held to, so a bad one must not."""
    errors = []
    channels, downsample = declared_latent(index)
    checks = SampleChecks(None, downsample)
    for shard in index.shards[:FIRST_SAMPLE_SHARDS]:
        samples = iter_samples(shard.path, cfg)
        try:
            for raw in samples:
                try:
                    sample = parse_sample(raw.key, raw.files, 0, shard.shard_id, raw.position,
                                          checks=checks)
                    if channels is not None and sample.mean.shape[0] != channels:
                        raise BadSample(f"sample {raw.key!r}: {sample.mean.shape[0]} latent "
                                        f"channels, the index declares {channels}")
                except BadSample as exc:
                    errors.append(str(exc))
                    continue
                meta_bucket = sample.group[0]
                sample.detach()  # the shard's buffer goes with the stream
                return sample, meta_bucket
        except Exception as exc:  # unreadable shard: try the next one
            errors.append(f"{shard.path}: {exc}")
        finally:
            samples.close()
    detail = "; ".join(errors[:3])
    tried = min(len(index.shards), FIRST_SAMPLE_SHARDS)
    raise NoReadableSample(f"{index.root}: no readable sample in its first {tried} shards "
                           f"({detail})")


def dataset_info(index: DatasetIndex, cfg: StorageConfig | None = None) -> DatasetInfo:
    sample, bucket = _first_sample(index, cfg)
    downsample = declared_latent(index)[1] or 8
    if bucket != "?" and declared_latent(index)[1] is None:
        downsample = max(1, int(bucket.split("x")[0]) // sample.mean.shape[1])
    try:
        empty = dict(load_tensors(storage.read_bytes(storage.join(index.root, EMPTY_PROMPT_NAME),
                                                     cfg)))
    except FileNotFoundError:
        empty = None
    return DatasetInfo(
        path=str(index.root),
        num_samples=index.num_samples,
        num_shards=index.num_shards,
        bucket_counts=index.bucket_counts,
        latent_channels=sample.mean.shape[0],
        latent_downsample=downsample,
        latent_dtype=str(sample.mean.dtype).removeprefix("torch."),
        text_dim=sample.hidden_states.shape[1],
        pooled_dim=sample.pooled.shape[0],
        t5_dim=None if sample.t5_hidden_states is None else sample.t5_hidden_states.shape[1],
        scaling_factor=index.scaling_factor,
        shift_factor=index.shift_factor,
        empty_prompt=empty,
    )


def read_dataset_info(path: str | Path, cfg: StorageConfig | None = None) -> DatasetInfo:
    """Dims, normalisation, bucket counts and the empty-prompt embedding of a latent dataset
    (a local directory or a URL prefix)."""
    return dataset_info(load_dataset_index(path, cfg), cfg)
