"""Fixtures: small latent-shard datasets written as real WebDataset tars in the documented
layout (shard_format.encode_sample, per-shard manifests, index.json, empty prompt)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import webdataset as wds
from safetensors.torch import save_file

from scaletrain.core.files import atomic_write_json
from scaletrain.data.shard_format import (
    EMPTY_PROMPT_NAME,
    INDEX_NAME,
    MANIFEST_SUFFIX,
    bucket_name,
    encode_sample,
)


@dataclass
class LatentDataset:
    root: Path
    scaling: float
    shift: float
    # key -> (shard name, latent dict, text dict, meta dict)
    samples: dict[str, tuple] = field(default_factory=dict)
    shard_keys: dict[str, list[str]] = field(default_factory=dict)

    @property
    def keys(self) -> set[str]:
        return set(self.samples)


def write_latent_dataset(
    root: Path,
    num_shards: int = 8,
    per_shard: int | list[int] = 12,
    buckets: tuple[tuple[int, int], ...] = ((64, 64), (64, 96), (96, 64)),
    channels: int = 4,
    text_dim: int = 16,
    pooled_dim: int = 8,
    t5_dim: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    zero_std: bool = False,
    scaling: float = 0.5,
    shift: float = 0.25,
    seed: int = 0,
    key_prefix: str = "s",
    first_shard: int = 0,
) -> LatentDataset:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * num_shards
    data = LatentDataset(root, scaling, shift)
    index_shards = []
    for shard, count in enumerate(counts, start=first_shard):
        name = f"{shard:06d}.tar"
        bucket_counts: dict[str, int] = {}
        keys = []
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(count):
                key = f"{key_prefix}{shard:03d}-{i:04d}"
                h, w = buckets[rng.randrange(len(buckets))]
                mean = torch.randn(channels, h // 8, w // 8, generator=gen).to(dtype)
                std = (
                    torch.zeros_like(mean)
                    if zero_std
                    else (0.1 + torch.rand(channels, h // 8, w // 8, generator=gen)).to(dtype)
                )
                length = rng.randint(3, 9)
                text = {
                    "hidden_states": torch.randn(length, text_dim, generator=gen).to(dtype),
                    "pooled": torch.randn(pooled_dim, generator=gen).to(dtype),
                }
                if t5_dim is not None:
                    t5_len = rng.randint(2, 6)
                    text["t5_hidden_states"] = torch.randn(t5_len, t5_dim, generator=gen).to(dtype)
                meta = {
                    "caption": f"caption {key}",
                    "original_size": [2 * h + i, 2 * w],
                    "crop_top_left": [i % 3, i % 5],
                    "target_size": [h, w],
                    "bucket": [h, w],
                }
                latent = {"mean": mean, "std": std}
                sink.write(encode_sample(key, latent, text, meta))
                data.samples[key] = (name, latent, text, meta)
                keys.append(key)
                b = bucket_name(h, w)
                bucket_counts[b] = bucket_counts.get(b, 0) + 1
        data.shard_keys[name] = keys
        manifest = {
            "shard": name,
            "num_samples": count,
            "buckets": bucket_counts,
            "latent": {"scaling_factor": scaling, "shift_factor": shift, "dtype": str(dtype)},
        }
        atomic_write_json(root / (name[:-4] + MANIFEST_SUFFIX), manifest)
        index_shards.append({"name": name, "num_samples": count, "buckets": bucket_counts})
    index_path = root / INDEX_NAME
    if first_shard and index_path.exists():  # adding shards to an existing dataset
        index_shards = json.loads(index_path.read_text())["shards"] + index_shards
        counts = [s["num_samples"] for s in index_shards]
    index = {
        "format_version": 1,
        "num_samples": sum(counts),
        "shards": index_shards,
        "latent": {"scaling_factor": scaling, "shift_factor": shift},
    }
    (root / INDEX_NAME).write_text(json.dumps(index), encoding="utf-8")
    empty = {  # non-zero, so its real tokens stand out from the padding
        "hidden_states": torch.full((2, text_dim), 0.5, dtype=dtype),
        "pooled": torch.full((pooled_dim,), 0.5, dtype=dtype),
    }
    if t5_dim is not None:
        empty["t5_hidden_states"] = torch.full((1, t5_dim), 0.5, dtype=dtype)
    save_file(empty, str(root / EMPTY_PROMPT_NAME))
    return data


@pytest.fixture
def make_dataset(tmp_path):
    counter = iter(range(1000))

    def make(**kwargs) -> LatentDataset:
        return write_latent_dataset(tmp_path / f"ds{next(counter)}", **kwargs)

    return make


@pytest.fixture
def dataset(make_dataset) -> LatentDataset:
    """8 shards x 12 samples, 3 aspect buckets."""
    return make_dataset()


def floor_of(state) -> int:
    """The lowest unfinished epoch over the sources of a merged loader state."""
    return min(source["floor"] for source in state["sources"].values())


def step_until_floor(loaders, floor: int, max_steps: int = 300):
    """Step every rank in lockstep until the merged state's lowest source floor reaches
    ``floor``; returns (Counter of (epoch, key) handed out, merged state). Closes them."""
    from collections import Counter

    from scaletrain.data.loader import merge_states

    iterators = [iter(loader) for loader in loaders]
    seen: Counter = Counter()
    try:
        for _ in range(max_steps):
            for it in iterators:
                batch = next(it)
                seen.update(zip(batch["epochs"], batch["keys"]))
            state = merge_states([loader.state_dict() for loader in loaders])
            if floor_of(state) >= floor:
                return seen, state
        raise AssertionError(f"floor {floor} not reached in {max_steps} steps")
    finally:
        for loader in loaders:
            loader.close()
