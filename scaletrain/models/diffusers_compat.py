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

import torch

from scaletrain.models.config import MMDiTConfig, UNetConfig
from scaletrain.models.layers import sincos_2d_cropped


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
    return {"pos_embed.pos_embed": table[None].contiguous()}
