"""What the exporter needs to write a diffusers model: its class, its config, its weights.

Parameter names are diffusers' already, so the weight map is the identity except for two
extras that fold exactly into the layer before them (the residual gate multiplies
``branch = W x + b`` elementwise, so ``beta * gamma * (W x + b) = (beta gamma W) x + beta gamma b``):

* MMDiT ``residual_scale`` beta and LayerScale ``ls_*.gamma`` -> ``attn.to_out.0``,
  ``attn.to_add_out``, ``ff.net.2``, ``ff_context.net.2``.

Options diffusers' classes cannot express are listed by :func:`unsupported_options`; a model
trained with them can still be exported as plain safetensors, just not in diffusers' layout.
No diffusers import here: plain dicts, so the exporter decides how to build the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from scaletrain.models.config import MMDiTConfig, UNetConfig
from scaletrain.models.layers import sincos_2d_cropped

DIFFUSERS_POS_EMBED = "pos_embed.pos_embed"  # SD3Transformer2DModel's stored sin-cos table


def diffusers_class_name(cfg: UNetConfig | MMDiTConfig) -> str:
    return "UNet2DConditionModel" if isinstance(cfg, UNetConfig) else "SD3Transformer2DModel"


def diffusers_config(cfg: UNetConfig | MMDiTConfig) -> dict:
    """kwargs for the diffusers class (= its config.json) that has this model's weights."""
    if isinstance(cfg, MMDiTConfig):
        return {
            "sample_size": cfg.sample_size,
            "patch_size": cfg.patch_size,
            "in_channels": cfg.in_channels,
            "num_layers": cfg.depth,
            "attention_head_dim": cfg.head_dim,
            "num_attention_heads": cfg.heads,
            "joint_attention_dim": cfg.joint_attention_dim,
            "caption_projection_dim": cfg.hidden_size,
            "pooled_projection_dim": cfg.pooled_projection_dim,
            "out_channels": cfg.out_channels or cfg.in_channels,
            "pos_embed_max_size": cfg.pos_embed_max_size,
            "qk_norm": "rms_norm" if cfg.qk_norm else None,
        }
    depths = list(cfg.transformer_layers_per_block)
    return {
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels or cfg.in_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        # diffusers' mid block reads transformer_layers_per_block[-1], as ours does; a level
        # without attention still needs a placeholder >= 1 there (its blocks ignore it).
        "transformer_layers_per_block": [max(d, 1) for d in depths],
        # SDXL's config names the number of heads "attention_head_dim" (a diffusers quirk).
        "attention_head_dim": [max(1, c // cfg.attention_head_dim) for c in cfg.block_out_channels],
        "cross_attention_dim": cfg.cross_attention_dim,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps,
        "use_linear_projection": True,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": cfg.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": cfg.pooled_projection_dim
        + cfg.num_time_ids * cfg.addition_time_embed_dim,
        "resnet_time_scale_shift": "default" if cfg.time_conditioning == "additive" else "scale_shift",
    }


def unsupported_options(cfg: UNetConfig | MMDiTConfig) -> list[str]:
    """Config switches whose forward diffusers' class cannot reproduce (empty = exportable)."""
    problems = []
    if isinstance(cfg, UNetConfig):
        if cfg.skip_scaling != "none":
            problems.append(f"skip_scaling={cfg.skip_scaling}")
        if cfg.skip_variance_preserving:
            problems.append("skip_variance_preserving=true")
        if cfg.qk_norm:
            problems.append("qk_norm=true (diffusers' SDXL U-Net has no QK-norm)")
    else:
        if cfg.norm != "layernorm":
            problems.append(f"norm={cfg.norm}")
        if cfg.mlp != "gelu":
            problems.append(f"mlp={cfg.mlp}")
        if cfg.mlp_ratio != 4.0:
            problems.append(f"mlp_ratio={cfg.mlp_ratio}")
    return problems


def diffusers_config_difference(source: Mapping[str, Any], cfg: UNetConfig | MMDiTConfig
                                ) -> tuple[str, Any, Any] | None:
    """The first field in which a diffusers ``config.json`` and ``cfg`` build different
    functions, as (field, source value, cfg value); None when they agree. Only fields our
    export writes are compared (what they do not write, we build at diffusers' defaults);
    then the options diffusers cannot express, which a diffusers file never has."""
    name = diffusers_class_name(cfg)
    if source.get("_class_name", name) != name:
        return "_class_name", source.get("_class_name"), name
    ours = diffusers_config(cfg)
    if isinstance(cfg, UNetConfig):
        ours.pop("sample_size")  # the U-Net's default resolution only; any size works
    else:
        ours["dual_attention_layers"] = []  # SD3.5 Medium's MMDiT-X blocks; ours have none
    for key, value in ours.items():
        if key in source and not _same_value(source[key], value):
            return key, source[key], value
    for option in unsupported_options(cfg):
        return f"model.{option.split('=')[0]}", "(not in diffusers)", option.split(" ")[0]
    if isinstance(cfg, MMDiTConfig) and cfg.residual_scale != 1.0:
        return "model.residual_scale", 1.0, cfg.residual_scale
    return None


def _same_value(theirs: Any, ours: Any) -> bool:
    """Equal as configs: diffusers accepts an int where a list has one value per level."""
    if isinstance(ours, (list, tuple)) and not isinstance(theirs, (list, tuple)):
        theirs = [theirs] * len(ours)
    if isinstance(ours, (list, tuple)):
        return len(theirs) == len(ours) and all(_same_value(a, b) for a, b in zip(theirs, ours))
    if isinstance(ours, float) or isinstance(theirs, float):
        return theirs is not None and ours is not None and float(theirs) == float(ours)
    return theirs == ours


def to_diffusers_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: UNetConfig | MMDiTConfig
) -> dict[str, torch.Tensor]:
    """Our state dict in diffusers' layout: identity names, beta/LayerScale folded in."""
    problems = unsupported_options(cfg)
    if problems:
        raise ValueError("not expressible in diffusers' layout: " + ", ".join(problems))
    out = {k: v for k, v in state_dict.items() if ".ls_" not in k}
    if isinstance(cfg, UNetConfig):
        return out
    beta = cfg.residual_scale
    targets = {
        "ls_attn": "attn.to_out.0",
        "ls_ff": "ff.net.2",
        "ls_attn_context": "attn.to_add_out",
        "ls_ff_context": "ff_context.net.2",
    }
    for i in range(cfg.depth):
        prefix = f"transformer_blocks.{i}."
        for ls_name, layer in targets.items():
            if prefix + layer + ".weight" not in out:
                continue  # the last block has no text output projection or text MLP
            gamma = state_dict.get(prefix + ls_name + ".gamma")
            scale = beta if gamma is None else beta * gamma.float()
            if gamma is None and beta == 1.0:
                continue
            for kind in ("weight", "bias"):
                key = f"{prefix}{layer}.{kind}"
                w = out[key]
                s = scale if not torch.is_tensor(scale) else (scale[:, None] if kind == "weight" else scale)
                out[key] = (w.float() * s).to(w.dtype)
    return out


def from_diffusers_names(names) -> dict[str, str]:
    """Our parameter name -> its name in a diffusers file (import). The identity, except
    that LayerScale gammas have none (the export folded them into the layer before)."""
    return {name: name for name in names if ".ls_" not in name}


def diffusers_extra_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Tensors a diffusers file holds that are none of our parameters, with the shape this
    config implies (see :func:`diffusers_extra_state`): checked on import, then ignored."""
    if not isinstance(cfg, MMDiTConfig):
        return {}
    side = cfg.pos_embed_max_size
    return {DIFFUSERS_POS_EMBED: (1, side * side, cfg.hidden_size)}


def diffusers_extra_state(cfg: UNetConfig | MMDiTConfig) -> dict[str, torch.Tensor]:
    """Tensors diffusers' checkpoint holds that ours computes on the fly (added for the exporter).

    SD3's ``PatchEmbed`` stores its full ``pos_embed_max_size``-square sin-cos table as a
    persistent buffer ``pos_embed.pos_embed`` (1, max^2, D); ours computes the crop it needs.
    The full table is our crop at grid = max (offset 0, same coordinate scaling).
    """
    if isinstance(cfg, UNetConfig):
        return {}
    m = cfg.pos_embed_max_size
    table = sincos_2d_cropped(cfg.hidden_size, m, m, m, cfg.sample_size // cfg.patch_size)
    return {DIFFUSERS_POS_EMBED: table[None].contiguous()}
