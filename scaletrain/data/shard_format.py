"""The on-disk format of latent shards: the contract between preprocessing and the loader.

An output directory holds:

* ``{stem}.tar``: a WebDataset shard, one sample per input image that passed, with files
    - ``{key}.latent.safetensors``: ``mean`` and ``std`` of the image encoder's latent
      distribution, each (C, h, w), in the stored dtype (bf16/fp16/fp32). The pixel encoder
      stores its exact output as ``mean`` and zeros as ``std``. Storing the distribution, not
      one draw, lets training draw a fresh latent every epoch (Rombach et al. 2022, sec. 3).
    - ``{key}.text.safetensors``: ``hidden_states`` (L, D) trimmed to the real token count,
      ``pooled`` (P,), and for SD3-style presets ``t5_hidden_states`` (Lt, Dt) trimmed to the
      real T5 token count. Lengths are the first dimensions; padding is the loader's job.
    - ``{key}.json``: ``key``, ``caption``, ``original_size`` [h, w], ``crop_top_left``
      [top, left], ``target_size`` [h, w] (SDXL micro-conditioning, Podell et al. 2023,
      sec. 2.2) and ``bucket`` [h, w].
* ``{stem}.manifest.json``: written after the tar is complete; counts, bucket counts, the
  encoders' identities and dtypes, the latent scaling/shift factors and the tar's sha256.
* ``index.json``: every complete shard with its counts (samples per epoch known in advance).
* ``errors.jsonl``: the ledger of skipped samples, one ``{"shard", "key", "reason"}`` a line.
* ``empty_prompt.text.safetensors``: the text encoders' output for the empty caption, used
  as the "null" conditioning of classifier-free guidance dropout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

LATENT_EXT = "latent.safetensors"
TEXT_EXT = "text.safetensors"
META_EXT = "json"
MANIFEST_SUFFIX = ".manifest.json"
INDEX_NAME = "index.json"
LEDGER_NAME = "errors.jsonl"
EMPTY_PROMPT_NAME = "empty_prompt.text.safetensors"
FORMAT_VERSION = 1


def bucket_name(height: int, width: int) -> str:
    """Canonical name of an aspect bucket, used as a key in manifests: '1024x768' (h x w)."""
    return f"{height}x{width}"


def encode_sample(
    key: str,
    latent: dict[str, torch.Tensor],
    text: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """One WebDataset sample dict (``__key__`` plus one bytes value per file)."""
    return {
        "__key__": key,
        LATENT_EXT: save_tensors({k: v.contiguous() for k, v in latent.items()}),
        TEXT_EXT: save_tensors({k: v.contiguous() for k, v in text.items()}),
        META_EXT: json.dumps({"key": key, **meta}, sort_keys=True).encode("utf-8"),
    }


def decode_sample(
    sample: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`encode_sample` for a raw (undecoded) WebDataset sample."""
    missing = [ext for ext in (LATENT_EXT, TEXT_EXT, META_EXT) if ext not in sample]
    if missing:
        where = sample.get("__url__", "?")
        raise KeyError(f"{where}: sample {sample.get('__key__')!r} lacks {', '.join(missing)}")
    latent = load_tensors(bytes(sample[LATENT_EXT]))
    text = load_tensors(bytes(sample[TEXT_EXT]))
    meta = json.loads(bytes(sample[META_EXT]).decode("utf-8"))
    return latent, text, meta


def read_json(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_index(directory: str | Path) -> dict[str, Any]:
    """The dataset index of a latent-shard directory, with a clear error when absent."""
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no dataset index; run `scaletrain preprocess` on this directory first"
        )
    return read_json(path)


# --------------------------------------------------------------------------- added by issue 5
# Names below were added after the first version of this contract; nothing above changed.
#
# Per-sample text tensors (names inside ``{key}.text.safetensors``); batched encoder output
# also carries the lengths, which a shard does not store (they are the first dimensions).
HIDDEN_STATES = "hidden_states"
POOLED = "pooled"
T5_HIDDEN_STATES = "t5_hidden_states"
LENGTHS = "lengths"
T5_LENGTHS = "t5_lengths"
# Per-shard error ledger, written with the shard; errors.jsonl is rebuilt from them.
SHARD_LEDGER_SUFFIX = ".errors.jsonl"
# Marker of a shard that could not be read (not complete; a rerun retries it).
FAILED_SUFFIX = ".failed.json"
# The full list of input shards of the run, so the index can say what is still missing.
PLAN_NAME = "plan.json"

# index.json layout (written by scaletrain.data.preprocess.output.finalize_index):
#   {"format_version": 1,
#    "shards": [{"name": "00000.tar", "num_samples": int, "bucket_counts": {"64x64": int},
#                "num_skipped": int, "sha256": str, "size_bytes": int}, ...],  # sorted by name
#    "num_shards": int, "num_samples": int, "bucket_counts": {...}, "num_skipped": int,
#    "image_encoder": {"kind", "latent_channels", "downsample", "scaling_factor",
#                      "shift_factor", "dtype", ...},
#    "text_encoder": {"preset", "hidden_dim", "pooled_dim", "t5_dim", "dtype", ...},
#    "config_fingerprint": str,
#    "complete": bool,           # every shard of plan.json has a manifest
#    "missing": [stem, ...],     # planned shards without a manifest (not done or failed)
#    "failed": [{"shard", "reason"}, ...]}
# A shard's manifest ({stem}.manifest.json) holds the same per-shard fields plus the input
# URL, its sha256 and byte count, the encoders' identities and the skip counts by reason.


def shard_entries(index: dict[str, Any]) -> list[dict[str, Any]]:
    """The shard list of an index, each with ``name`` (relative to the directory) and
    ``num_samples``; raises a clear error on an index of another format version."""
    version = index.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"index format_version {version!r}; this code reads {FORMAT_VERSION}")
    return list(index["shards"])


# --------------------------------------------------------------------------- added by issue 14
# Per-member checksums: a shard's manifest maps every member name ("{key}.{ext}") to the
# 64-bit XXH3 hash of its bytes, and the index says the dataset carries them. It catches the
# bit rot that leaves the tar and safetensors headers intact. XXH3 (~20 GB/s on one AVX2
# core, measured) rather than zlib's CRC-32 (~1.7 GB/s): at SDXL shard sizes CRC-32 alone took
# a third of the loader's time per sample (docs/benchmarks.md, loader checks); the tar's
# sha256 is slower still and needs the whole file. Datasets written without them have
# neither key; the loader then reads them unverified (and says so once).
MEMBER_CHECKSUMS = "member_xxh3"


def member_checksum(data: bytes | bytearray | memoryview) -> int:
    """The checksum recorded for one tar member's bytes (XXH3-64, as an integer)."""
    return xxhash.xxh3_64_intdigest(data)
