"""Model configs. `arch` is the tag that picks the class in the root config's `model` section.

Defaults are the standard designs: ``UNetConfig()`` is the SDXL base U-Net and
``MMDiTConfig()`` is SD3-medium's MMDiT (d=24) with SD3's QK-normalisation. Every stability
option from the design notes (seeds 001/002) is a switch here whose default keeps the
standard design, so the defaults reproduce diffusers' parameter counts exactly (see
tests/models/test_param_counts.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from scaletrain.core.config_base import ConfigError, require, to_dict

# Skip-scaling modes of the U-Net's long skips (seed 001 § 5.2):
#   none      w_s = 1                                   (SDXL)
#   constant  w_s = skip_constant, 1/sqrt(2) by default (score-SDE "skip_rescale", ScaleLong)
#   per_level w_s = skip_kappa[level]                   (§ 5.2 B, "deep-small, shallow-large")
#   log_snr   w_s = kappa_level * sigmoid(beta * (logSNR(t) - tau))   (§ 5.2 C)
SkipScaling = Literal["none", "constant", "per_level", "log_snr"]


@dataclass
class InitConfig:
    """Where a new run's weights come from, and which of them train (every ``arch`` has these).

    ``init_from`` is read once, at step 0 of a new run (``scaletrain.train.init_weights``); a
    run that resumes from its own checkpoint ignores it and says so in its log.
    """

    # Start from these weights instead of a random init: a diffusers model or pipeline folder
    # (its unet/ or transformer/), an SDXL or SD3/SD3.5 single .safetensors file, a
    # `scaletrain export` directory, a scaletrain run directory or one of its
    # checkpoints/step_N, or a Hugging Face hub id (fetched like a local folder).
    init_from: str | None = None
    # Every model parameter must be in the source with its shape, and nothing else. false: load
    # what fits; parameters the source lacks keep their init, and both lists are logged.
    init_strict: bool = True
    init_weights: Literal["raw", "ema"] = "raw"  # from a scaletrain run/checkpoint: which weights
    # From a scaletrain run/checkpoint: also carry over its Adam moments and EMA (at any world
    # size and ZeRO stage). The data position always starts afresh.
    init_optimizer: bool = False
    init_keep_step: bool = False  # from a scaletrain run/checkpoint: continue its step count
    # Train only the parameters whose name matches this regular expression (re.search on
    # diffusers' parameter names, e.g. "attn" or "^transformer_blocks\.(2[0-9]|3[0-7])\.");
    # the rest are frozen and hold no optimizer state or EMA. null: train every parameter.
    # `scaletrain model-info CONFIG model.trainable=RE` counts what a pattern selects.
    trainable: str | None = None
    # Written by training, not read: what init_from resolved to (kind, files with sha256, key
    # counts). Kept in the run's config.yaml and every export's metadata.
    init_record: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        require(self.init_from is None or bool(self.init_from.strip()), "init_from",
                "must be a path or hub id, or null")
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except re.error as exc:
                raise ConfigError(
                    f"trainable: {self.trainable!r} is not a regular expression: {exc}") from None


@dataclass
class UNetConfig(InitConfig):
    """SDXL-style U-Net. Levels are counted from the full-resolution one (level 0)."""

    arch: Literal["unet"] = "unet"
    in_channels: int = 4
    out_channels: int | None = None  # None: same as in_channels
    sample_size: int = 128  # latent height/width the model is trained at (model-info FLOPs)
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280])
    layers_per_block: int = 2
    # Transformer depth per level; 0 = no attention at that level ("attention only at chosen
    # levels", seed 001 § 9). The mid block uses the last level's depth.
    transformer_layers_per_block: list[int] = field(default_factory=lambda: [0, 2, 10])
    attention_head_dim: int = 64  # heads per level = channels // attention_head_dim
    cross_attention_dim: int = 2048  # text hidden size (CLIP-L 768 + OpenCLIP-bigG 1280)
    pooled_projection_dim: int = 1280  # added_cond_kwargs["text_embeds"] width
    addition_time_embed_dim: int = 256  # sinusoidal width of each of the 6 SDXL time_ids
    text_seq_len: int = 77  # text tokens assumed by model-info's FLOP count
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    # ResBlock time conditioning: "additive" (SDXL/DDPM: h + W e(t), then GroupNorm) or
    # "scale_shift" (AdaGN, ADM: GN(h) * (1 + s(t)) + b(t); seed 001 § 2.2.3).
    time_conditioning: Literal["additive", "scale_shift"] = "additive"
    # Zero-init the last conv of every residual branch (and each attention block's proj_out)
    # so each block starts as the identity (seed 001 § 9, improved-diffusion's zero_module).
    zero_init_residual: bool = False
    skip_scaling: SkipScaling = "none"  # none | constant | per_level | log_snr (see above)
    skip_constant: float = 1.0 / math.sqrt(2.0)  # w_s when skip_scaling=constant
    skip_kappa: list[float] | None = None  # one per level (level 0 = full resolution)
    skip_snr_beta: float = 1.0  # slope beta of the log_snr gate sigmoid(beta (logSNR - tau))
    skip_snr_tau: float = 0.0  # logSNR at which the log_snr gate is half open
    # Variance-preserving merge (seed 001 § 5.1 step IV): y = (d + w s) / sqrt(1 + w^2),
    # applied to the two halves of the concatenation.
    skip_variance_preserving: bool = False
    # The noise schedule the U-Net uses to turn its integer timestep into logSNR(t) for the
    # log_snr skip schedule: SD's scaled-linear betas. Keep equal to the diffusion section.
    schedule_beta_start: float = 0.00085
    schedule_beta_end: float = 0.012
    schedule_num_timesteps: int = 1000
    qk_norm: bool = False  # RMSNorm per head on q and k of every attention (not in SDXL)
    gradient_checkpointing: bool = False  # per ResBlock and per attention block

    def __post_init__(self) -> None:
        super().__post_init__()
        levels = len(self.block_out_channels)
        require(self.in_channels > 0, "in_channels", f"must be > 0, got {self.in_channels}")
        require(
            self.out_channels is None or self.out_channels > 0,
            "out_channels",
            f"must be > 0 or null, got {self.out_channels}",
        )
        require(levels >= 1, "block_out_channels", "needs at least one level")
        for i, ch in enumerate(self.block_out_channels):
            require(ch > 0, f"block_out_channels[{i}]", f"must be > 0, got {ch}")
            require(
                ch % self.norm_num_groups == 0,
                f"block_out_channels[{i}]",
                f"{ch} is not divisible by norm_num_groups={self.norm_num_groups}",
            )
        require(self.layers_per_block >= 1, "layers_per_block", "must be >= 1")
        require(
            len(self.transformer_layers_per_block) == levels,
            "transformer_layers_per_block",
            f"needs one entry per level ({levels}), got {len(self.transformer_layers_per_block)}",
        )
        require(
            all(n >= 0 for n in self.transformer_layers_per_block),
            "transformer_layers_per_block",
            "entries must be >= 0",
        )
        require(
            self.transformer_layers_per_block[-1] >= 1,
            "transformer_layers_per_block",
            "the last level must have >= 1 transformer layer (the mid block uses its depth)",
        )
        for i, (ch, n) in enumerate(zip(self.block_out_channels, self.transformer_layers_per_block)):
            if n:
                require(
                    ch % self.attention_head_dim == 0,
                    "attention_head_dim",
                    f"{self.attention_head_dim} does not divide block_out_channels[{i}]={ch}",
                )
        require(
            self.sample_size % (2 ** (levels - 1)) == 0,
            "sample_size",
            f"{self.sample_size} is not divisible by 2**(levels-1) = {2 ** (levels - 1)}",
        )
        for name in ("cross_attention_dim", "pooled_projection_dim", "text_seq_len"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(
            self.addition_time_embed_dim > 0 and self.addition_time_embed_dim % 2 == 0,
            "addition_time_embed_dim",
            "must be a positive even number",
        )
        require(self.block_out_channels[0] % 2 == 0, "block_out_channels[0]", "must be even")
        if self.skip_scaling == "per_level":
            require(self.skip_kappa is not None, "skip_kappa", "required when skip_scaling=per_level")
        if self.skip_kappa is not None:
            require(
                len(self.skip_kappa) == levels,
                "skip_kappa",
                f"needs one value per level ({levels}), got {len(self.skip_kappa)}",
            )
        require(self.skip_snr_beta > 0, "skip_snr_beta", "must be > 0")
        require(
            0 < self.schedule_beta_start < self.schedule_beta_end < 1,
            "schedule_beta_start",
            "need 0 < schedule_beta_start < schedule_beta_end < 1",
        )
        require(self.schedule_num_timesteps > 1, "schedule_num_timesteps", "must be > 1")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def num_time_ids(self) -> int:
        # SDXL micro-conditioning: original (h, w), crop top-left (y, x), target (h, w).
        return 6


@dataclass
class MMDiTConfig(InitConfig):
    """SD3-style MMDiT, sized by depth d: hidden 64*d, d heads."""

    arch: Literal["mmdit"] = "mmdit"
    depth: int = 24
    num_heads: int | None = None  # None: = depth (SD3's sizing rule)
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None  # None: same as in_channels
    sample_size: int = 128  # latent height/width (base of the positional grid; model-info)
    pos_embed_max_size: int = 192  # side of the sin-cos grid that is centre-cropped (SD3)
    joint_attention_dim: int = 4096  # text hidden size (T5-XXL width; CLIP padded to it)
    pooled_projection_dim: int = 2048  # CLIP-L 768 + OpenCLIP-bigG 1280 pooled
    text_seq_len: int = 333  # text tokens (77 CLIP + 256 T5) assumed by model-info's FLOPs
    # Stability switches (seed 001 Part III, seed 002 "SD3: QK-normalization"):
    adaln_zero: bool = True  # zero-init modulation and output: every block starts as identity
    qk_norm: bool = True  # RMSNorm per head on q, k (and the text stream's q, k)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # the pre-norms (no affine)
    mlp: Literal["gelu", "swiglu"] = "gelu"  # feed-forward: GELU MLP (SD3) or SwiGLU (LLaMA)
    mlp_ratio: float = 4.0  # GELU hidden = ratio*D; SwiGLU hidden = 2/3 of that (same params)
    residual_scale: float = 1.0  # beta in h + beta * g * F(h) (seed 001 § 10.2)
    layer_scale_init: float | None = None  # LayerScale (CaiT) per-channel init, e.g. 1e-4
    norm_eps: float = 1e-6
    gradient_checkpointing: bool = False  # per joint block

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.depth > 0, "depth", f"must be > 0, got {self.depth}")
        require(self.num_heads is None or self.num_heads > 0, "num_heads", "must be > 0 or null")
        require(self.head_dim > 0 and self.head_dim % 4 == 0, "head_dim", "must be a multiple of 4")
        require(self.patch_size > 0, "patch_size", "must be > 0")
        require(self.in_channels > 0, "in_channels", f"must be > 0, got {self.in_channels}")
        require(
            self.out_channels is None or self.out_channels > 0, "out_channels", "must be > 0 or null"
        )
        require(
            self.sample_size % self.patch_size == 0,
            "sample_size",
            f"{self.sample_size} is not divisible by patch_size={self.patch_size}",
        )
        require(
            self.pos_embed_max_size >= self.sample_size // self.patch_size,
            "pos_embed_max_size",
            f"must be >= sample_size/patch_size = {self.sample_size // self.patch_size}",
        )
        require(self.hidden_size % 4 == 0, "head_dim", "hidden size must be divisible by 4")
        for name in ("joint_attention_dim", "pooled_projection_dim", "text_seq_len"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.mlp_ratio > 0, "mlp_ratio", "must be > 0")
        require(self.residual_scale > 0, "residual_scale", "must be > 0")
        require(
            self.layer_scale_init is None or self.layer_scale_init > 0,
            "layer_scale_init",
            "must be > 0 or null",
        )

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else self.depth

    @property
    def hidden_size(self) -> int:
        return self.heads * self.head_dim


@dataclass
class ToyConfig(InitConfig):
    """A small MLP denoiser (``models/toy.py``): engine tests and benchmarks, not for images.

    It takes the latent, the timestep and the pooled text embedding only (no token states),
    so it trains on ``data.synthetic`` tensors as well as on real shards."""

    arch: Literal["toy"] = "toy"
    in_channels: int = 4
    sample_size: int = 8  # latent height/width; the MLP sees in_channels * sample_size^2 values
    pooled_projection_dim: int = 16
    width: int = 64  # hidden width
    depth: int = 4  # linear layers before the output
    text_seq_len: int = 0  # no token states (model-info reads this field)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("in_channels", "sample_size", "pooled_projection_dim", "width", "depth"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")


# The ``model`` section: a tagged union on ``arch``, so overrides stay flat (model.depth=24).
ModelConfig = UNetConfig | MMDiTConfig | ToyConfig


# Fields that do not change what a model computes from given weights: initialisation choices,
# cost switches, inputs of the FLOP count, and the init keys themselves. Two configs that
# differ only here hold interchangeable weights. (LayerScale's init value is one; whether
# LayerScale exists is not, and shows up as parameters.)
_NOT_ARCHITECTURE = frozenset(
    {f.name for f in fields(InitConfig)}
    | {"gradient_checkpointing", "text_seq_len", "zero_init_residual", "adaln_zero"}
)


def architecture_difference(source: Mapping[str, Any], cfg: ModelConfig
                            ) -> tuple[str, Any, Any] | None:
    """The first field in which ``source`` (a model section as a dict: an export's or a run's
    config) and ``cfg`` build different functions, as (field, source value, cfg value); None
    when they agree. Fields the source does not record are not compared."""
    ours = to_dict(cfg)
    ignore = set(_NOT_ARCHITECTURE)
    if isinstance(cfg, UNetConfig):
        ignore.add("sample_size")  # the U-Net works at any size; model-info's FLOPs use it
    for name, value in ours.items():
        if name in ignore or name not in source:
            continue
        theirs = source[name]
        if name == "layer_scale_init":  # only whether it exists matters once weights are given
            theirs, value = theirs is not None, value is not None
        if theirs != value:
            return name, theirs, value
    return None
