"""SDXL-style U-Net (Podell et al. 2023) with the skip-path stability options of seed 001.

Conv stem; down levels of ResBlocks (GroupNorm, SiLU, conv, time conditioning) with
transformer blocks (self-attention, cross-attention to the text tokens, GEGLU MLP) at the
levels whose ``transformer_layers_per_block`` is > 0; a middle block; up levels that
concatenate the long skips; GroupNorm, SiLU, conv out. The time embedding is a sinusoid of
the timestep through an MLP, plus SDXL's added conditioning: the pooled text embedding and
the six micro-conditioning scalars (original size, crop top-left, target size), each
embedded sinusoidally, concatenated, projected and added (SDXL § 2.2).

Names are diffusers' UNet2DConditionModel's, so the state dict maps onto it one to one
(tests/models/test_unet.py loads diffusers' weights and compares outputs).

Long-skip merge at resolution level l (seed 001 § 4-5, unified operator
y = Fuse(w_d d, w_s s)), applied to every concatenation [d; s] of decoder features d and
encoder skip s:

* ``skip_scaling``: w_s = 1 | 1/sqrt(2) | kappa_l | kappa_l * sigmoid(beta (logSNR(t) - tau))
  (ScaleLong, Huang et al. 2023; § 5.2 A-C). logSNR(t) comes from the timestep via
  ``noise_schedule`` (SD's scaled-linear schedule unless configured otherwise).
* ``skip_variance_preserving``: both halves divided by sqrt(w_d^2 + w_s^2) with w_d = 1,
  so a later linear layer sees (d + w s)/sqrt(1 + w^2), whose variance stays that of a
  single stream for weakly correlated unit-variance d and s (§ 5.1 step IV).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.models.config import UNetConfig
from scaletrain.models.diagnostics import DiagnosticsMixin
from scaletrain.models.layers import (
    Attention,
    Conv2d,
    FeedForward,
    Linear,
    TimestepEmbedding,
    maybe_checkpoint,
    time_condition,
    timestep_embedding,
)
from scaletrain.models.noise_schedule import log_snr_at, scaled_linear_log_snr_table


class ResnetBlock2D(nn.Module):
    """GN-SiLU-conv, time conditioning, GN-SiLU-conv, plus a (1x1-conv) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig):
        super().__init__()
        self.mode = cfg.time_conditioning
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # AdaGN needs a scale and a shift per channel; additive needs one bias per channel.
        temb_out = 2 * out_ch if self.mode == "scale_shift" else out_ch
        self.time_emb_proj = nn.Linear(cfg.time_embed_dim, temb_out)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        # zero_init_residual: the block is exactly its shortcut at init
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1, zero_init=cfg.zero_init_residual)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``temb`` is the already SiLU-activated time embedding."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = time_condition(h, self.time_emb_proj(temb), self.norm2, self.mode)
        h = self.conv2(F.silu(h))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class BasicTransformerBlock(nn.Module):
    """Post-residual pre-LN block: self-attention, cross-attention to text, GEGLU MLP."""

    def __init__(self, dim: int, cfg: UNetConfig):
        super().__init__()
        heads, head_dim = dim // cfg.attention_head_dim, cfg.attention_head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, qk_norm=cfg.qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, kv_dim=cfg.cross_attention_dim, qk_norm=cfg.qk_norm)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, 4 * dim, "geglu")

    def forward(self, x, context, mask):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, linear in, ``depth`` transformer blocks on the HW tokens, linear out, residual."""

    def __init__(self, channels: int, depth: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, cfg) for _ in range(depth)])
        # zero_init_residual: the attention block is exactly the identity at init
        self.proj_out = Linear(channels, channels, zero_init=cfg.zero_init_residual)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, mask)
        tokens = self.proj_out(tokens)
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv (ADM, seed 001 § 2.2.4)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Shared plumbing of down/up levels: resnets, optional attentions, checkpointing."""

    gradient_checkpointing = False

    def _layer(self, i: int, h, temb, context, mask):
        h = maybe_checkpoint(self.gradient_checkpointing, self.resnets[i], h, temb)
        if self.attentions is not None:
            h = maybe_checkpoint(self.gradient_checkpointing, self.attentions[i], h, context, mask)
        return h


class DownBlock(_Level):
    def __init__(self, in_ch: int, out_ch: int, depth: int, downsample: bool, cfg: UNetConfig):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(n)])
        self.attentions = (
            nn.ModuleList([Transformer2DModel(out_ch, depth, cfg) for _ in range(n)]) if depth else None
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, h, temb, context, mask):
        skips = []
        for i in range(len(self.resnets)):
            h = self._layer(i, h, temb, context, mask)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock(_Level):
    def __init__(self, out_ch, prev_ch, skip_chs, depth, upsample, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D((prev_ch if i == 0 else out_ch) + skip_ch, out_ch, cfg)
                for i, skip_ch in enumerate(skip_chs)
            ]
        )
        self.attentions = (
            nn.ModuleList([Transformer2DModel(out_ch, depth, cfg) for _ in skip_chs]) if depth else None
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, h, skips, temb, context, mask, merge):
        """``skips``: this level's skip tensors in the order they were made (used last first)."""
        for i in range(len(self.resnets)):
            h = merge(h, skips[-1 - i])  # the merge stays outside any checkpointed region
            h = self._layer(i, h, temb, context, mask)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class UNetMidBlock2DCrossAttn(_Level):
    def __init__(self, channels: int, depth: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, cfg) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(channels, depth, cfg)])

    def forward(self, h, temb, context, mask):
        ckpt = self.gradient_checkpointing
        h = maybe_checkpoint(ckpt, self.resnets[0], h, temb)
        h = maybe_checkpoint(ckpt, self.attentions[0], h, context, mask)
        return maybe_checkpoint(ckpt, self.resnets[1], h, temb)


class UNet2DConditionModel(DiagnosticsMixin, nn.Module):
    """``forward(sample, timestep, encoder_hidden_states, added_cond_kwargs, encoder_attention_mask)``.

    sample (B, C, H, W); timestep (B,) or scalar, discrete 0..T-1 (floats allowed);
    encoder_hidden_states (B, L, cross_attention_dim); added_cond_kwargs = {"text_embeds":
    (B, pooled_projection_dim), "time_ids": (B, 6)}; encoder_attention_mask (B, L), 1 = keep.
    Returns the prediction (B, out_channels, H, W) as a plain tensor.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        chs = cfg.block_out_channels
        levels = len(chs)
        depths = cfg.transformer_layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], cfg.time_embed_dim)
        add_in = cfg.pooled_projection_dim + cfg.num_time_ids * cfg.addition_time_embed_dim
        self.add_embedding = TimestepEmbedding(add_in, cfg.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        skip_chs = [chs[0]]  # channels of every tensor pushed on the skip stack, in order
        prev = chs[0]
        for lvl, ch in enumerate(chs):
            last = lvl == levels - 1
            self.down_blocks.append(DownBlock(prev, ch, depths[lvl], not last, cfg))
            skip_chs += [ch] * (cfg.layers_per_block + (0 if last else 1))
            prev = ch

        self.mid_block = UNetMidBlock2DCrossAttn(chs[-1], depths[-1], cfg)

        self.up_blocks = nn.ModuleList()
        prev = chs[-1]
        for lvl in reversed(range(levels)):
            n = cfg.layers_per_block + 1
            mine, skip_chs = skip_chs[-n:], skip_chs[:-n]
            self.up_blocks.append(
                UpBlock(chs[lvl], prev, list(reversed(mine)), depths[lvl], lvl > 0, cfg)
            )
            prev = chs[lvl]

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels or cfg.in_channels, 3, padding=1)

        self._log_snr_tables: dict[str, torch.Tensor] = {}
        self.set_gradient_checkpointing(cfg.gradient_checkpointing)
        self._clear_diagnostics()

    def blocks(self) -> list[nn.Module]:
        """The units of regional compilation (train.compile: blocks): every ResBlock and every
        transformer block, each compiled on its own. Repeated blocks of one shape share one
        compiled graph, so compile time grows with the number of distinct shapes, not depth."""
        return [m for m in self.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, _Level):
                module.gradient_checkpointing = bool(enabled)

    # ------------------------------------------------------------------ skip scaling

    def log_snr(self, timestep: torch.Tensor) -> torch.Tensor:
        """logSNR(t) of the configured scaled-linear schedule, per sample (float32)."""
        key = str(timestep.device)
        if key not in self._log_snr_tables:
            c = self.config
            table = scaled_linear_log_snr_table(
                c.schedule_beta_start, c.schedule_beta_end, c.schedule_num_timesteps
            )
            self._log_snr_tables[key] = table.to(timestep.device)
        return log_snr_at(timestep, self._log_snr_tables[key])

    def skip_weights(self, timestep: torch.Tensor) -> list[torch.Tensor | float | None]:
        """w_s per level: None (=1), a float, or a (B, 1, 1, 1) tensor for the log-SNR gate."""
        c = self.config
        levels = len(c.block_out_channels)
        kappa = c.skip_kappa or [1.0] * levels
        if c.skip_scaling == "none":
            return [None] * levels
        if c.skip_scaling == "constant":
            return [c.skip_constant] * levels
        if c.skip_scaling == "per_level":
            return list(kappa)
        gate = torch.sigmoid(c.skip_snr_beta * (self.log_snr(timestep) - c.skip_snr_tau))
        gate = gate[:, None, None, None]
        return [k * gate for k in kappa]

    def _merge(self, level: int, w, d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if w is not None:
            s = s * (w.to(s.dtype) if torch.is_tensor(w) else w)
        if self.config.skip_variance_preserving:
            w2 = 1.0 if w is None else w * w
            norm = torch.rsqrt(1.0 + w2).to(d.dtype) if torch.is_tensor(w2) else (1.0 + w2) ** -0.5
            d, s = d * norm, s * norm
        if self.diagnostics_enabled:
            d, s = self._watch_merge(level, d, s)
        return torch.cat([d, s], dim=1)

    def _watch_merge(self, level: int, d: torch.Tensor, s: torch.Tensor):
        """Record ||s'||/||d'|| now and, via hooks, ||grad s'||/||grad d'|| in backward.

        The views give s' and d' their own autograd nodes, so each hook sees only the
        gradient flowing through this merge (a skip tensor also feeds the next down layer).
        """
        d, s = d.view_as(d), s.view_as(s)
        with torch.no_grad():
            d_norm = torch.linalg.vector_norm(d.float()).clamp_min(1e-12)
            self._record(f"skip_ratio/level{level}", torch.linalg.vector_norm(s.float()) / d_norm)
        if torch.is_grad_enabled() and d.requires_grad and s.requires_grad:
            norms: dict[str, torch.Tensor] = {}

            def hook(name):
                def fn(grad):
                    norms[name] = torch.linalg.vector_norm(grad.detach().float())
                    if len(norms) == 2:
                        ratio = norms["s"] / norms["d"].clamp_min(1e-30)
                        self._record(f"skip_grad_ratio/level{level}", ratio)

                return fn

            s.register_hook(hook("s"))
            d.register_hook(hook("d"))
        return d, s

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.config
        batch = sample.shape[0]
        levels = len(c.block_out_channels)
        factor = 2 ** (levels - 1)
        if sample.shape[-2] % factor or sample.shape[-1] % factor:
            raise ValueError(f"sample size {tuple(sample.shape[-2:])} is not divisible by {factor}")
        missing = {"text_embeds", "time_ids"} - set(added_cond_kwargs or {})
        if missing:
            raise ValueError(
                f"added_cond_kwargs is missing {sorted(missing)}: the SDXL U-Net needs "
                '{"text_embeds": (B, pooled_projection_dim), "time_ids": (B, 6)}'
            )
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)

        dtype = self.time_embedding.linear_1.weight.dtype
        temb = self.time_embedding(timestep_embedding(timestep, c.block_out_channels[0]).to(dtype))
        time_ids = added_cond_kwargs["time_ids"]
        text_embeds = added_cond_kwargs["text_embeds"]
        ids = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim).reshape(batch, -1)
        temb = temb + self.add_embedding(torch.cat([text_embeds, ids.to(text_embeds.dtype)], -1).to(dtype))
        temb = F.silu(temb)  # every ResBlock reads SiLU(emb); compute it once

        mask = None
        if encoder_attention_mask is not None:  # 1 = attend; as a large negative bias
            mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0)[:, None, None, :]

        context = encoder_hidden_states
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, out = block(h, temb, context, mask)
            skips += out
        h = self.mid_block(h, temb, context, mask)
        weights = self.skip_weights(timestep)
        for i, block in enumerate(self.up_blocks):
            level = levels - 1 - i

            def merge(d, s, level=level):
                return self._merge(level, weights[level], d, s)

            # Pass this level's skips as their own list: engines may copy a module's
            # arguments (ZeRO-3 hooks do), so a callee popping a shared list is unsafe.
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            h = block(h, mine, temb, context, mask, merge)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
