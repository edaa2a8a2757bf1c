"""Latent shards in the documented layout (scaletrain.data.shard_format), written directly
with random tensors: a training run's data without the preprocessing (and its encoders)."""

from __future__ import annotations

import json
import random

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

CHANNELS, SIDE, TEXT_DIM = 12, 16, 64  # the tiny presets: 12-channel latents, 64-dim text


def write_shards(root, num_shards=2, per_shard=12, seed=0, side=SIDE):
    """Latent shards in the documented layout (shard_format), one bucket of side x side
    latents (images 8 x side; 128x128 by default)."""
    root.mkdir(parents=True)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    h = w = side * 8
    shards = []
    for s in range(num_shards):
        name = f"{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(per_shard):
                key = f"s{s}-{i:03d}"
                mean = torch.randn(CHANNELS, side, side, generator=gen)
                length = rng.randint(3, 8)
                text = {"hidden_states": torch.randn(length, TEXT_DIM, generator=gen),
                        "pooled": torch.randn(TEXT_DIM, generator=gen)}
                meta = {"caption": key, "original_size": [h, w], "crop_top_left": [0, 0],
                        "target_size": [h, w], "bucket": [h, w]}
                sink.write(encode_sample(key, {"mean": mean, "std": torch.zeros_like(mean)},
                                         text, meta))
        buckets = {bucket_name(h, w): per_shard}
        atomic_write_json(root / (name[:-4] + MANIFEST_SUFFIX), {
            "shard": name, "num_samples": per_shard, "buckets": buckets,
            "latent": {"scaling_factor": 1.0, "shift_factor": 0.0, "dtype": "torch.float32"}})
        shards.append({"name": name, "num_samples": per_shard, "buckets": buckets})
    (root / INDEX_NAME).write_text(json.dumps({
        "format_version": 1, "num_samples": num_shards * per_shard, "shards": shards,
        "latent": {"scaling_factor": 1.0, "shift_factor": 0.0}}))
    save_file({"hidden_states": torch.zeros(2, TEXT_DIM), "pooled": torch.zeros(TEXT_DIM)},
              str(root / EMPTY_PROMPT_NAME))
    return root
