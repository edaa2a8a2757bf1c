"""Per-sample checks made when a sample is read (issue 14): each raises BadSample, which the
stream turns into a loss event: the sample is skipped, named once, counted (``bad_samples``)
and recorded in the loader's quarantine (its state), never fatal and never silent.

Kept apart from decoding (:mod:`.batching`) so that each check is one small function:

* :func:`verify_members`: the bytes of each member against the checksum (XXH3-64) the shard's manifest
  records (bit rot that leaves the tar and safetensors headers intact);
* :func:`check_finite`: NaN/inf in the latent distribution or the text states;
* :func:`check_declared`: the dataset's declared latent dtype, and the latent's spatial size
  against its bucket (a 12x5x7 latent in a 64x64 bucket of an 8x VAE);
* :func:`check_meta_numbers`: SDXL micro-conditioning pairs must be two finite numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from scaletrain.data import storage
from scaletrain.data.shard_format import MANIFEST_SUFFIX, MEMBER_CHECKSUMS, member_checksum
from scaletrain.data.storage import StorageConfig


class BadSample(ValueError):
    """A sample inside a readable tar cannot be used (missing file, wrong shapes, corrupt)."""


def read_member_checksums(root: str, shard_name: str, cfg: StorageConfig | None
                          ) -> dict[str, int] | None:
    """The per-member checksums of one shard from its manifest; None when it records none.
    Raises (the shard then counts as failed) when the manifest cannot be read, since a
    dataset that declares checksums must not be read unverified."""
    stem = shard_name[: -len(".tar")] if shard_name.endswith(".tar") else shard_name
    manifest = storage.read_json(storage.join(root, stem + MANIFEST_SUFFIX), cfg)
    checksums = manifest.get(MEMBER_CHECKSUMS)
    return checksums if isinstance(checksums, dict) else None


def verify_members(key: str, files: dict[str, Any], checksums: dict[str, int],
                   computed: dict[str, int] | None = None) -> None:
    """Every member of the sample has the checksum its manifest recorded (``computed``: the
    checksums the reader thread already took of ``files``)."""
    for ext, data in files.items():
        expected = checksums.get(f"{key}.{ext}")
        if expected is None:
            raise BadSample(f"sample {key!r}: member {key}.{ext} is not in the manifest's "
                            "checksums")
        actual = computed[ext] if computed is not None and ext in computed else \
            member_checksum(data)
        if actual != expected:
            raise BadSample(f"sample {key!r}: member {key}.{ext} fails its checksum "
                            "(corrupted bytes)")


def check_finite(key: str, tensors: dict[str, torch.Tensor | None]) -> None:
    """No NaN or inf in any of ``tensors``.

    Tested on the float32 sum of each tensor: NaN and inf always propagate into it, and it is
    one allocation-free pass (``isfinite().all()`` costs 16x more on bf16: it materialises a
    mask). A finite tensor whose sum overflows float32 (values near 1e38, which no encoder
    produces) is rejected too, rightly."""
    for name, tensor in tensors.items():
        if tensor is None or not tensor.is_floating_point():
            continue
        # bf16 and fp32 sums keep their range (about 3e38); an fp16 sum would overflow at
        # 65504, so it is taken in float32 (three times slower than a same-dtype sum).
        total = tensor.sum(dtype=torch.float32 if tensor.dtype == torch.float16 else None)
        if not math.isfinite(float(total)):
            raise BadSample(f"sample {key!r}: {name} holds non-finite values (NaN or inf)")


def check_declared(key: str, mean: torch.Tensor, std: torch.Tensor, bucket: Any,
                   latent_dtype: torch.dtype | None, downsample: int | None) -> None:
    """The latent is floating point, of the dataset's declared dtype, and its (h, w) is its
    bucket's size divided by the VAE's downsampling factor."""
    for name, tensor in (("latent mean", mean), ("latent std", std)):
        if not tensor.is_floating_point():
            raise BadSample(f"sample {key!r}: {name} has dtype {tensor.dtype}, not floating "
                            "point")
        if latent_dtype is not None and tensor.dtype != latent_dtype:
            raise BadSample(f"sample {key!r}: {name} has dtype {tensor.dtype}, the dataset "
                            f"declares {latent_dtype}")
    if downsample and isinstance(bucket, (list, tuple)) and len(bucket) == 2:
        want = (int(bucket[0]) // downsample, int(bucket[1]) // downsample)
        if tuple(mean.shape[1:]) != want:
            raise BadSample(f"sample {key!r}: latent of shape {tuple(mean.shape)} does not fit "
                            f"its bucket {bucket[0]}x{bucket[1]} (expected (C, {want[0]}, "
                            f"{want[1]}))")


def check_meta_numbers(key: str, name: str, value: Any) -> list[float]:
    """A micro-conditioning pair: two finite numbers (not null, not booleans)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise BadSample(f"sample {key!r}: meta {name!r} must be [a, b], got {value!r:.80}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in value):
        raise BadSample(f"sample {key!r}: meta {name!r} must hold two finite numbers, got "
                        f"{value!r:.80}")
    return [float(v) for v in value]
