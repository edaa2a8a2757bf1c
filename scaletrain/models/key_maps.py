"""Where each of our parameters lives in released checkpoints: diffusers folders and the
original single files of SDXL (Stability's ``sgm`` code) and SD3/SD3.5.

Our parameter names are diffusers' (:mod:`.diffusers_compat`), so a diffusers file holds each
parameter under its own name. The single files use the names of the code that trained them,
and in SD3's a tensor may hold several of ours, so a map gives, for each of our parameters, the
*pieces* to concatenate along dim 0: ``(source key, first row, end row)`` (rows ``None``: the
whole tensor). A reader can then load any row range of one parameter, e.g. a ZeRO-3 rank its
own partition, without reading the rest of the file.

SDXL, ``model.diffusion_model.*`` (sgm ``UNetModel``; L = layers_per_block)::

    conv_in                         input_blocks.0.0
    time_embedding.linear_{1,2}     time_embed.{0,2}
    add_embedding.linear_{1,2}      label_emb.0.{0,2}
    down_blocks.b.resnets.l         input_blocks.(1 + b(L+1) + l).0   (resnet names below)
    down_blocks.b.attentions.l      input_blocks.(1 + b(L+1) + l).1   (same inner names)
    down_blocks.b.downsamplers.0.conv   input_blocks.((b+1)(L+1)).0.op
    mid_block.resnets.{0,1} / attentions.0   middle_block.{0,2} / middle_block.1
    up_blocks.b.resnets.l           output_blocks.(b(L+1) + l).0
    up_blocks.b.attentions.l        output_blocks.(b(L+1) + l).1
    up_blocks.b.upsamplers.0.conv   output_blocks.(b(L+1) + L).{2 with attention, else 1}.conv
    conv_norm_out / conv_out        out.0 / out.2
    resnet: norm1 in_layers.0, conv1 in_layers.2, time_emb_proj emb_layers.1,
            norm2 out_layers.0, conv2 out_layers.3, conv_shortcut skip_connection

SD3 / SD3.5, ``model.diffusion_model.*`` (or no prefix; mmdit ``MMDiT``; D = hidden size)::

    pos_embed.proj                  x_embedder.proj
    time_text_embed.timestep_embedder.linear_{1,2}   t_embedder.mlp.{0,2}
    time_text_embed.text_embedder.linear_{1,2}       y_embedder.mlp.{0,2}
    context_embedder               context_embedder
    transformer_blocks.i.attn.to_{q,k,v}        joint_blocks.i.x_block.attn.qkv rows [0,D) [D,2D) [2D,3D)
    transformer_blocks.i.attn.add_{q,k,v}_proj  joint_blocks.i.context_block.attn.qkv (same rows)
    attn.norm_{q,k} / norm_added_{q,k}          x_block.attn.ln_{q,k} / context_block.attn.ln_{q,k}
    attn.to_out.0 / attn.to_add_out             x_block.attn.proj / context_block.attn.proj
    norm1.linear / norm1_context.linear         {x,context}_block.adaLN_modulation.1
    ff.net.0.proj, ff.net.2 (ff_context.*)      {x,context}_block.mlp.fc1, fc2
    proj_out                                    final_layer.linear
    norm_out.linear                             final_layer.adaLN_modulation.1, halves swapped

The swapped halves: SD3's final AdaLN (and the last block's text-stream AdaLN, which only
modulates) emits (shift, scale); diffusers' ``AdaLayerNormContinuous``, and ours, (scale,
shift). SD3's ``pos_embed`` (the stored sin-cos table) has no counterpart: we compute it.

Both directions are here (``*_state_dict`` writes a single file's tensors from ours), so
each map is tested round trip, and against diffusers' own converters from the single files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from scaletrain.models.config import MMDiTConfig, UNetConfig
from scaletrain.models.diffusers_compat import (
    DIFFUSERS_POS_EMBED,
    diffusers_extra_state,
    to_diffusers_state_dict,
)

SINGLE_FILE_PREFIX = "model.diffusion_model."
SD3_POS_EMBED = "pos_embed"  # SD3's stored positional table


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` (dim 0) of tensor ``key`` in a source; ``None``: all of it."""

    key: str
    start: int | None = None
    stop: int | None = None


# Our parameter name -> the pieces (in order) whose concatenation along dim 0 is its value.
KeyMap = dict[str, tuple[Piece, ...]]


def identity_map(names: Iterable[str], prefix: str = "") -> KeyMap:
    return {name: (Piece(prefix + name),) for name in names}


# ----------------------------------------------------------------------------- SDXL (sgm)

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_unet_name(name: str, cfg: UNetConfig) -> str | None:
    """The sgm (SDXL single-file) name of our U-Net parameter ``name``, without the prefix;
    None for a parameter sgm's U-Net does not have (e.g. QK-norm weights)."""
    step = cfg.layers_per_block + 1
    up_has_attention = [d > 0 for d in reversed(cfg.transformer_layers_per_block)]

    def resnet(kind: str, rest: str) -> str | None:
        return f"{_RESNET[kind]}.{rest}" if kind in _RESNET else None

    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0",
             "conv_out": "out.2"}
    module, _, leaf = name.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{leaf}"
    patterns: list[tuple[str, object]] = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda b, i, k, r: _join(f"input_blocks.{1 + b * step + i}.0", resnet(k, r))),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda b, i, r: f"input_blocks.{1 + b * step + i}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda b, r: f"input_blocks.{(b + 1) * step}.0.op.{r}"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda i, k, r: _join(f"middle_block.{2 * i}", resnet(k, r))),
        (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda b, i, k, r: _join(f"output_blocks.{b * step + i}.0", resnet(k, r))),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda b, i, r: f"output_blocks.{b * step + i}.1.{r}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda b, r: f"output_blocks.{b * step + step - 1}."
                      f"{2 if up_has_attention[b] else 1}.conv.{r}"),
    ]
    for pattern, build in patterns:
        m = re.fullmatch(pattern, name)
        if m:
            args = [int(g) if g.isdigit() else g for g in m.groups()]
            out = build(*args)  # type: ignore[operator]
            # QK-norm has no sgm counterpart (SDXL has none).
            return None if out is None or ".norm_q." in out or ".norm_k." in out else out
    return None


def _join(head: str, tail: str | None) -> str | None:
    return None if tail is None else f"{head}.{tail}"


def sgm_unet_key_map(cfg: UNetConfig, names: Iterable[str], prefix: str = SINGLE_FILE_PREFIX
                     ) -> KeyMap:
    out: KeyMap = {}
    for name in names:
        theirs = sgm_unet_name(name, cfg)
        if theirs is not None:
            out[name] = (Piece(prefix + theirs),)
    return out


# ----------------------------------------------------------------------------- SD3 / SD3.5

_SD3_FIXED = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
_SD3_BLOCK = {  # our module inside transformer_blocks.i -> (stream, their module, qkv row block)
    "attn.to_q": ("x_block", "attn.qkv", 0),
    "attn.to_k": ("x_block", "attn.qkv", 1),
    "attn.to_v": ("x_block", "attn.qkv", 2),
    "attn.add_q_proj": ("context_block", "attn.qkv", 0),
    "attn.add_k_proj": ("context_block", "attn.qkv", 1),
    "attn.add_v_proj": ("context_block", "attn.qkv", 2),
    "attn.norm_q": ("x_block", "attn.ln_q", None),
    "attn.norm_k": ("x_block", "attn.ln_k", None),
    "attn.norm_added_q": ("context_block", "attn.ln_q", None),
    "attn.norm_added_k": ("context_block", "attn.ln_k", None),
    "attn.to_out.0": ("x_block", "attn.proj", None),
    "attn.to_add_out": ("context_block", "attn.proj", None),
    "norm1.linear": ("x_block", "adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block", "adaLN_modulation.1", None),
    "ff.net.0.proj": ("x_block", "mlp.fc1", None),
    "ff.net.2": ("x_block", "mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block", "mlp.fc1", None),
    "ff_context.net.2": ("context_block", "mlp.fc2", None),
}


def _swapped(key: str, dim: int) -> tuple[Piece, ...]:
    """(scale, shift) from a tensor that stores (shift, scale) along dim 0."""
    return (Piece(key, dim, 2 * dim), Piece(key, 0, dim))


def sd3_key_map(cfg: MMDiTConfig, names: Iterable[str], prefix: str = SINGLE_FILE_PREFIX
                ) -> KeyMap:
    """Pieces of SD3's single file for each of our MMDiT parameters (None-mapped ones, e.g.
    LayerScale gammas, are left out: the source does not have them)."""
    dim, last = cfg.hidden_size, cfg.depth - 1
    out: KeyMap = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        if module in _SD3_FIXED:
            out[name] = (Piece(f"{prefix}{_SD3_FIXED[module]}.{leaf}"),)
            continue
        if module == "norm_out.linear":
            out[name] = _swapped(f"{prefix}final_layer.adaLN_modulation.1.{leaf}", dim)
            continue
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
        if not m or m.group(2) not in _SD3_BLOCK:
            continue
        i = int(m.group(1))
        stream, theirs, row_block = _SD3_BLOCK[m.group(2)]
        key = f"{prefix}joint_blocks.{i}.{stream}.{theirs}.{leaf}"
        if row_block is not None:
            out[name] = (Piece(key, row_block * dim, (row_block + 1) * dim),)
        elif m.group(2) == "norm1_context.linear" and i == last:
            out[name] = _swapped(key, dim)  # the last block's text stream only modulates
        else:
            out[name] = (Piece(key),)
    return out


# ----------------------------------------------------------------------------- writing


def assemble(state: Mapping[str, torch.Tensor], key_map: KeyMap) -> dict[str, torch.Tensor]:
    """The source tensors that ``key_map`` reads ``state`` from: the map run backwards."""
    rows: dict[str, int] = {}
    for pieces in key_map.values():
        for p in pieces:
            if p.stop is not None:
                rows[p.key] = max(rows.get(p.key, 0), p.stop)
    out: dict[str, torch.Tensor] = {}
    for name, pieces in key_map.items():
        value, offset = state[name], 0
        for p in pieces:
            if p.start is None:
                out[p.key] = value.clone()
                continue
            n = p.stop - p.start
            if p.key not in out:
                out[p.key] = torch.empty((rows[p.key], *value.shape[1:]), dtype=value.dtype)
            out[p.key][p.start:p.stop] = value[offset:offset + n]
            offset += n
    return out


def sgm_unet_state_dict(state: Mapping[str, torch.Tensor], cfg: UNetConfig
                        ) -> dict[str, torch.Tensor]:
    """Our U-Net weights as the ``model.diffusion_model.*`` part of an SDXL single file."""
    folded = to_diffusers_state_dict(dict(state), cfg)  # refuses what SDXL cannot express
    key_map = sgm_unet_key_map(cfg, folded)
    _check_complete(folded, key_map, "SDXL single-file")
    return assemble(folded, key_map)


def sd3_state_dict(state: Mapping[str, torch.Tensor], cfg: MMDiTConfig
                   ) -> dict[str, torch.Tensor]:
    """Our MMDiT weights as the ``model.diffusion_model.*`` part of an SD3 single file, with
    its stored positional table (residual scale and LayerScale folded, as for diffusers)."""
    folded = to_diffusers_state_dict(dict(state), cfg)
    key_map = sd3_key_map(cfg, folded)
    _check_complete(folded, key_map, "SD3 single-file")
    out = assemble(folded, key_map)
    out[SINGLE_FILE_PREFIX + SD3_POS_EMBED] = diffusers_extra_state(cfg)[DIFFUSERS_POS_EMBED]
    return out


def sd3_extra_shapes(cfg: MMDiTConfig, prefix: str = SINGLE_FILE_PREFIX
                     ) -> dict[str, tuple[int, ...]]:
    """Tensors an SD3 file holds that are none of our parameters, with the shape this config
    implies: the stored sin-cos table (we compute it), checked, then ignored."""
    side = cfg.pos_embed_max_size
    return {prefix + SD3_POS_EMBED: (1, side * side, cfg.hidden_size)}


def _check_complete(state: Mapping[str, torch.Tensor], key_map: KeyMap, layout: str) -> None:
    lost = sorted(set(state) - set(key_map))
    if lost:
        raise ValueError(f"not expressible in the {layout} layout: {', '.join(lost[:5])}")
