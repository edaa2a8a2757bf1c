"""Config of the offline preprocessing (issue 5): raw image-caption shards -> latent shards.

The section has three parts: how images are filtered, bucketed and cropped (top level), which
image encoder makes latents (``image_encoder``), and which text encoders make the
conditioning (``text_encoder``). Runtime-only keys (batch size, workers, device, progress)
do not change what is written, so they are left out of the fingerprint that a rerun compares
with the manifests already on disk (see :func:`output_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from scaletrain.core.config_base import require, to_dict

Dtype = Literal["bf16", "fp16", "fp32"]

# Keys that change how fast the run goes but not a single byte of what it writes.
RUNTIME_KEYS = ("batch_size", "decode_workers", "device", "progress", "cpu_threads")


@dataclass
class ImageEncoderConfig:
    """The image encoder: a diffusers AutoencoderKL, or exact space-to-depth of pixels."""

    # "vae": diffusers AutoencoderKL; "pixel": invertible space-to-depth for pixel-space models.
    kind: Literal["vae", "pixel"] = "vae"
    # VAE: a hub id or a local directory in diffusers layout.
    name: str = "stabilityai/sdxl-vae"
    # VAE: folder inside `name` holding the VAE (e.g. "vae" for a full pipeline repo).
    subfolder: str | None = None
    # Pixel: side of the patch folded into channels (3x64x64 -> 12x32x32 for 2).
    factor: int = 2
    # Storage dtype of the latent mean and std.
    dtype: Dtype = "bf16"
    # Dtype the VAE runs in (the SDXL VAE overflows in fp16; bf16 or fp32 are safe).
    compute_dtype: Dtype = "fp32"
    # Latent scaling factor; null takes it from the VAE's config (pixel: 1).
    scaling_factor: float | None = None
    # Latent shift factor; null takes it from the VAE's config, or 0 when it has none.
    shift_factor: float | None = None

    def __post_init__(self) -> None:
        require(self.factor >= 1, "factor", f"must be >= 1, got {self.factor}")
        if self.kind == "vae":
            require(bool(self.name), "name", "a VAE needs a hub id or a local path")

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side (the VAE's is checked when it loads)."""
        return self.factor if self.kind == "pixel" else 8


@dataclass
class TextModelConfig:
    """One text encoder, from transformers (CLIP, T5) or open_clip, by hub id or local path."""

    # Which library loads it.
    library: Literal["transformers", "open_clip"] = "transformers"
    # transformers: hub id or local dir. open_clip: a model name (with `pretrained`),
    # "hf-hub:org/repo", or "local-dir:/path" (open_clip_config.json + weights).
    name: str = ""
    # transformers: folder inside `name` with the model (e.g. "text_encoder_2").
    subfolder: str | None = None
    # transformers: tokenizer id or dir; null uses `name`.
    tokenizer: str | None = None
    # transformers: folder inside the tokenizer source (e.g. "tokenizer_2").
    tokenizer_subfolder: str | None = None
    # open_clip: a pretrained tag or a local checkpoint file (only with a plain model name).
    pretrained: str | None = None
    # open_clip: a JSON model config file (or a folder of them) registered before loading.
    model_config: str | None = None
    # Tokens per caption, special tokens included; longer captions are truncated.
    max_length: int = 77

    def __post_init__(self) -> None:
        require(self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")


@dataclass
class ClipLConfig(TextModelConfig):
    """CLIP ViT-L/14 (SDXL's first and SD3's first text encoder)."""

    # Hub id or local dir of a transformers CLIP text model.
    name: str = "openai/clip-vit-large-patch14"


@dataclass
class ClipGConfig(TextModelConfig):
    """OpenCLIP ViT-bigG/14 (SDXL's second and SD3's second text encoder)."""

    # open_clip by default; "transformers" for a converted CLIPTextModelWithProjection.
    library: Literal["transformers", "open_clip"] = "open_clip"
    # open_clip name, "hf-hub:org/repo" or "local-dir:/path"; or a transformers id/dir.
    name: str = "hf-hub:laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


@dataclass
class T5Config(TextModelConfig):
    """T5-XXL encoder (SD3's third text encoder)."""

    # Hub id or local dir of a transformers T5 encoder.
    name: str = "google/t5-v1_1-xxl"
    # T5 tokens per caption; states are stored only up to the real length.
    max_length: int = 256


@dataclass
class TinyTextConfig:
    """The tiny CLIP text encoder of the offline demo, built and saved on first use."""

    # Where the built model is saved (and found again): "<cache_dir>/tiny_clip-<hash>".
    cache_dir: str = "~/.cache/scaletrain"
    # Width of the transformer = channels of hidden_states.
    hidden_size: int = 64
    # Width of the pooled (projected) embedding.
    projection_dim: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 32
    # Seed of the random initialisation; the build is deterministic.
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.hidden_size % self.heads == 0, "hidden_size", "must be divisible by heads")
        require(self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")


@dataclass
class TextEncoderConfig:
    """Which text encoders condition the model, and how their outputs are stored."""

    # sdxl: CLIP-L + bigG penultimate states (768+1280=2048 channels) and pooled bigG (1280).
    # sd3: the same CLIP pair, pooled CLIP-L+bigG (2048), plus T5 states (4096).
    # tiny_clip: one tiny CLIP built locally (the offline demo).
    preset: Literal["sdxl", "sd3", "tiny_clip"] = "sdxl"
    clip_l: ClipLConfig = field(default_factory=ClipLConfig)
    clip_g: ClipGConfig = field(default_factory=ClipGConfig)
    t5: T5Config = field(default_factory=T5Config)
    tiny: TinyTextConfig = field(default_factory=TinyTextConfig)
    # Storage dtype of hidden states and pooled embeddings.
    dtype: Dtype = "bf16"
    # Dtype the text encoders run in.
    compute_dtype: Dtype = "fp32"
    # Store CLIP states only up to the real token count (false: all max_length positions,
    # as SDXL saw them in training).
    trim_clip: bool = True


@dataclass
class PreprocessConfig:
    """How raw image-caption shards become latent shards."""

    # Buckets hold about resolution**2 pixels (SDXL: 1024).
    resolution: int = 1024
    # Bucket sides are multiples of this.
    bucket_step: int = 64
    # Explicit buckets as [height, width] pairs; null generates SDXL's list for `resolution`.
    buckets: list[list[int]] | None = None
    # Skip images whose longer/shorter side ratio is above this; also bounds the buckets.
    max_aspect_ratio: float = 4.0
    # Skip images whose shorter side is below this many pixels.
    min_size: int = 256
    # Skip images with more pixels than this as decompression bombs (PIL's own error level).
    max_image_pixels: int = 178_956_970
    # Crop to the bucket at the center, or at a random offset seeded by (seed, key).
    crop: Literal["center", "random"] = "center"
    # Seed of random crops.
    seed: int = 0
    # Resampling filter for the resize to the bucket.
    resample: Literal["lanczos", "bicubic", "bilinear"] = "lanczos"
    # Apply the EXIF orientation tag before anything else.
    exif_transpose: bool = True
    # Keep samples whose caption is empty (otherwise they are skipped and recorded).
    allow_empty_captions: bool = False
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # Samples per encoder call (all of one bucket).
    batch_size: int = 32
    # DataLoader processes that read and decode raw shards (0: in the main process).
    decode_workers: int = 2
    # "auto": cuda (the local rank's GPU) when available, else cpu; or e.g. "cuda:1", "cpu".
    device: str = "auto"
    # Torch threads of the encoding process on the CPU (0: torch's default). On a shared or
    # small CPU, 1 avoids threads spinning against each other (often 10x faster).
    cpu_threads: int = 0
    # Show a progress bar (samples/s and errors).
    progress: bool = True

    def __post_init__(self) -> None:
        require(self.bucket_step >= 1, "bucket_step", f"must be >= 1, got {self.bucket_step}")
        require(
            self.resolution % self.bucket_step == 0,
            "resolution",
            f"must be a multiple of bucket_step={self.bucket_step}, got {self.resolution}",
        )
        require(
            self.bucket_step % self.image_encoder.downsample == 0,
            "bucket_step",
            f"must be a multiple of the image encoder's downsampling "
            f"({self.image_encoder.downsample}), got {self.bucket_step}",
        )
        require(
            self.max_aspect_ratio >= 1.0,
            "max_aspect_ratio",
            f"must be >= 1, got {self.max_aspect_ratio}",
        )
        require(self.min_size >= 1, "min_size", f"must be >= 1, got {self.min_size}")
        require(self.max_image_pixels >= 1, "max_image_pixels", "must be >= 1")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.decode_workers >= 0, "decode_workers", "must be >= 0")
        require(self.cpu_threads >= 0, "cpu_threads", "must be >= 0 (0: torch's default)")
        if self.buckets is not None:
            require(len(self.buckets) > 0, "buckets", "must list at least one [height, width]")
            for i, bucket in enumerate(self.buckets):
                ok = len(bucket) == 2 and all(
                    s > 0 and s % self.image_encoder.downsample == 0 for s in bucket
                )
                require(
                    ok,
                    f"buckets[{i}]",
                    f"must be [height, width], positive multiples of "
                    f"{self.image_encoder.downsample}, got {bucket}",
                )


def fingerprinted_config(cfg: PreprocessConfig) -> dict[str, Any]:
    """The keys that change the bytes written (runtime keys excluded), as a nested dict:
    what :func:`output_fingerprint` hashes and ``plan.json`` records, so that a rerun with
    another config can be told which keys differ."""
    data = to_dict(cfg)
    for key in RUNTIME_KEYS:
        data.pop(key, None)
    # Where the tiny demo encoder is cached does not change it (its build is seeded).
    data["text_encoder"]["tiny"].pop("cache_dir", None)
    return data


def output_fingerprint(cfg: PreprocessConfig) -> str:
    """A short hash of every key that changes the bytes written (runtime keys excluded).

    Manifests record it; a rerun into the same directory with a different fingerprint would
    mix two datasets, so it stops with an error instead.
    """
    blob = json.dumps(fingerprinted_config(cfg), sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key old -> new`` for every dotted key whose value differs between two
    :func:`fingerprinted_config` dicts, sorted."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out
