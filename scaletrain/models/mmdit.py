"""SD3-style MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers").

Patchify (p=2) plus 2-D sin-cos positions; a linear context embedder for the text tokens;
timestep + pooled-text embedding as the conditioning vector; ``depth`` joint blocks with
separate weights per stream (image x, text c) and one attention over [x; c]; a final AdaLN,
linear and unpatchify. Sized by depth d: hidden 64 d, d heads (SD3 § 5.3).

Each block, for each stream (seed 001 Part III, unified residual operator):

    u    = AdaLN(h; y)                      (Pre-LN, shift/scale from the conditioning y)
    h   += beta * g_attn(y) * LS(Attn(u))   (joint attention over both streams)
    h   += beta * g_mlp(y)  * LS(MLP(AdaLN(h; y)))

with g from adaLN-Zero (zero at init, so each block starts as the identity), beta the
residual scale (1 in SD3) and LS an optional LayerScale. Both beta and LayerScale fold
exactly into ``to_out.0`` / ``ff.net.2`` on export; everything else has diffusers'
SD3Transformer2DModel names.

Timesteps are SD3's: t in [0, 1] scaled by 1000 by the caller (``timestep = 1000 * t``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.models.config import MMDiTConfig
from scaletrain.models.diagnostics import DiagnosticsMixin
from scaletrain.models.layers import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    Attention,
    FeedForward,
    LayerScale,
    Linear,
    TimestepEmbedding,
    make_norm,
    maybe_checkpoint,
    mlp_hidden_dim,
    modulate,
    sincos_2d_cropped,
    timestep_embedding,
)

TIME_PROJ_DIM = 256  # SD3's sinusoidal timestep width


class PatchEmbed(nn.Module):
    """Conv patchify + SD3's centre-cropped sin-cos positions (computed, not stored)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.dim = cfg.hidden_size
        self.max_size = cfg.pos_embed_max_size
        self.base_size = cfg.sample_size // cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, self.dim, cfg.patch_size, stride=cfg.patch_size)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def pos_embed(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        key = (grid_h, grid_w, str(device))
        if key not in self._pos_cache:
            pos = sincos_2d_cropped(self.dim, grid_h, grid_w, self.max_size, self.base_size, "cpu")
            self._pos_cache[key] = pos.to(device)[None]
        return self._pos_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        grid_h, grid_w = x.shape[-2] // p, x.shape[-1] // p
        # (B, D, h, w) -> (B, h*w, D); made contiguous here, or every later op would inherit
        # the transposed layout and each linear layer would copy its input.
        tokens = self.proj(x).flatten(2).transpose(1, 2).contiguous()
        # Positions are added in float32 (as SD3 does) and the sum cast back.
        return (tokens + self.pos_embed(grid_h, grid_w, x.device)).to(tokens.dtype)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """Conditioning vector y = MLP(sinusoid(t)) + MLP(pooled text)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # same linear-SiLU-linear shape

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t = timestep_embedding(timestep, TIME_PROJ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.timestep_embedder(t.to(pooled.dtype)) + self.text_embedder(pooled)


class JointTransformerBlock(nn.Module):
    """One MMDiT block: per-stream AdaLN-Zero and MLPs, one joint attention.

    ``context_pre_only`` (the last block): the text stream is only read, not updated, so
    it has no gates, text output projection or text MLP (as SD3).
    """

    def __init__(self, cfg: MMDiTConfig, context_pre_only: bool):
        super().__init__()
        dim = cfg.hidden_size
        self.context_pre_only = context_pre_only
        self.residual_scale = cfg.residual_scale
        zero = cfg.adaln_zero
        self.norm1 = AdaLayerNormZero(dim, cfg.norm, cfg.norm_eps, zero_init=zero)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(dim, cfg.norm, cfg.norm_eps, zero_init=zero)
        else:
            self.norm1_context = AdaLayerNormZero(dim, cfg.norm, cfg.norm_eps, zero_init=zero)
        self.attn = Attention(
            dim,
            cfg.heads,
            cfg.head_dim,
            bias=True,
            qk_norm=cfg.qk_norm,
            eps=1e-6,
            context_dim=dim,
            context_pre_only=context_pre_only,
        )
        mlp_kind = "gelu_tanh" if cfg.mlp == "gelu" else "swiglu"
        hidden = mlp_hidden_dim(dim, cfg.mlp_ratio, mlp_kind)
        self.norm2 = make_norm(cfg.norm, dim, cfg.norm_eps)
        self.ff = FeedForward(dim, hidden, mlp_kind)
        if not context_pre_only:
            self.norm2_context = make_norm(cfg.norm, dim, cfg.norm_eps)
            self.ff_context = FeedForward(dim, hidden, mlp_kind)
        ls = cfg.layer_scale_init
        self.ls_attn = LayerScale(dim, ls) if ls else None
        self.ls_ff = LayerScale(dim, ls) if ls else None
        self.ls_attn_context = LayerScale(dim, ls) if ls and not context_pre_only else None
        self.ls_ff_context = LayerScale(dim, ls) if ls and not context_pre_only else None

    def _residual(self, h, gate, branch, layer_scale):
        """h + beta * gate * LS(branch)."""
        if layer_scale is not None:
            branch = layer_scale(branch)
        if self.residual_scale != 1.0:
            gate = gate * self.residual_scale
        return h + gate * branch

    def forward(self, x: torch.Tensor, c: torch.Tensor, cond: torch.Tensor):
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, cond)
        if self.context_pre_only:
            nc = self.norm1_context(c, cond)
        else:
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, cond)

        attn_x, attn_c = self.attn.joint(nx, nc)

        x = self._residual(x, gate_msa, attn_x, self.ls_attn)
        ff_in = modulate(self.norm2(x), shift_mlp, scale_mlp)
        x = self._residual(x, gate_mlp, self.ff(ff_in), self.ls_ff)

        if self.context_pre_only:
            return x, None
        c = self._residual(c, c_gate_msa, attn_c, self.ls_attn_context)
        ff_in = modulate(self.norm2_context(c), c_shift_mlp, c_scale_mlp)
        c = self._residual(c, c_gate_mlp, self.ff_context(ff_in), self.ls_ff_context)
        return x, c


class MMDiT(DiagnosticsMixin, nn.Module):
    """``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep)``.

    Shapes: hidden_states (B, C, H, W) latents; encoder_hidden_states (B, L, joint_attention_dim);
    pooled_projections (B, pooled_projection_dim); timestep (B,) or scalar, = 1000 * t.
    Returns the prediction (B, out_channels, H, W) as a plain tensor.
    """

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [JointTransformerBlock(cfg, context_pre_only=i == cfg.depth - 1) for i in range(cfg.depth)]
        )
        self.norm_out = AdaLayerNormContinuous(dim, cfg.norm, cfg.norm_eps, zero_init=cfg.adaln_zero)
        # DiT zero-initialises the final linear too, so the model's output starts at 0.
        self.proj_out = Linear(dim, cfg.patch_size**2 * self.out_channels, zero_init=cfg.adaln_zero)
        self._clear_diagnostics()

    def blocks(self) -> list[nn.Module]:
        """The units of regional compilation (train.compile: blocks): the joint blocks, each
        compiled on its own (all but the last share one graph, so compile time is flat in
        depth)."""
        return list(self.transformer_blocks)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = bool(enabled)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor | float,
    ) -> torch.Tensor:
        batch, _, height, width = hidden_states.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch_size={p}")
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)

        x = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        c = self.context_embedder(encoder_hidden_states)
        cond = F.silu(temb)  # every AdaLN reads SiLU(y); compute it once

        for i, block in enumerate(self.transformer_blocks):
            x_in = x
            x, c = maybe_checkpoint(self.gradient_checkpointing, block, x, c, cond)
            if self.diagnostics_enabled:
                self._record_residual_update(i, x_in, x)

        x = self.proj_out(self.norm_out(x, cond))
        # Unpatchify: (B, h*w, p*p*C) -> (B, C, h*p, w*p).
        gh, gw = height // p, width // p
        x = x.reshape(batch, gh, gw, p, p, self.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(batch, self.out_channels, gh * p, gw * p)

    @torch.no_grad()
    def _record_residual_update(self, index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        update = torch.linalg.vector_norm((after - before).float())
        base = torch.linalg.vector_norm(before.float()).clamp_min(1e-12)
        self._record(f"resid_update/block{index}", update / base)
