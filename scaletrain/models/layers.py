"""Building blocks shared by the U-Net and the MMDiT.

Module and parameter names follow diffusers (``to_q``, ``to_out.0``, ``ff.net.0.proj``,
``norm1.linear``, ``time_embedding.linear_1`` ...) so that a checkpoint maps onto diffusers'
layout by name, and the numerics follow diffusers too (same chunk order of modulation
vectors, same GEGLU half order, same sinusoid layout), which the tests check by loading
diffusers' weights into these modules and comparing outputs.

Initialisation: every module that owns parameters initialises them in its own constructor
through ``reset_parameters()`` (zero-initialised layers are :class:`Linear` / :class:`Conv2d`
with ``zero_init=True``). So a model is correctly initialised however it is built: directly,
under DeepSpeed's ``zero.Init`` (which partitions each module right after its constructor),
or on the meta device and materialised later by :func:`init_module_` one module at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

NormKind = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "gelu_tanh", "geglu", "swiglu"]


# --------------------------------------------------------------------------- initialisation


def init_module_(module: nn.Module) -> None:
    """(Re-)initialise the parameters ``module`` owns directly (not its children's)."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


class Linear(nn.Linear):
    """``nn.Linear`` that can start at zero (AdaLN-Zero modulation, zero-init output layers).

    The zeroing lives in ``reset_parameters``, which runs inside the module's own
    constructor. That keeps it correct when an engine takes each module's parameters away
    as soon as the module is built (DeepSpeed ZeRO-3's ``zero.Init`` partitions them right
    after ``__init__``): initialising from a parent module afterwards would be too late.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, zero_init: bool = False):
        object.__setattr__(self, "zero_init", zero_init)  # read by reset_parameters in __init__
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        if not self.zero_init:
            return super().reset_parameters()
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that can start at zero; see :class:`Linear`."""

    def __init__(self, *args, zero_init: bool = False, **kwargs):
        object.__setattr__(self, "zero_init", zero_init)
        super().__init__(*args, **kwargs)

    def reset_parameters(self) -> None:
        if not self.zero_init:
            return super().reset_parameters()
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def maybe_checkpoint(enabled: bool, fn: Callable, *args):
    """Run ``fn(*args)``, under activation checkpointing when enabled and grads are on.

    ``use_reentrant=False``: works with inputs that do not require grad, with keyword-free
    closures, and composes with autograd hooks (PyTorch's recommended mode).
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# --------------------------------------------------------------------------- normalisation


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019; seed 001 § 11.4): x / sqrt(mean(x^2) + eps) * w."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim)) if elementwise_affine else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


def make_norm(kind: NormKind, dim: int, eps: float, affine: bool = False) -> nn.Module:
    """The pre-norm of a transformer block: LayerNorm or RMSNorm (seed 001 § 11.3-11.4)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, elementwise_affine=affine)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation (seed 001 § 11.1): (1 + gamma) * x + beta.

    (Plain ops: an out-of-place ``addcmul`` with a broadcast ``shift`` first copies it to the
    full output shape, which is slower on CPU.)
    """
    return x * (1 + scale) + shift


# --------------------------------------------------------------------------- time embeddings


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (N,) -> (N, dim).

    Transformer positional encoding (Vaswani et al. 2017) as DDPM uses it: frequencies
    max_period^(-i / (dim/2 - shift)); flip_sin_to_cos puts cos first (SDXL and SD3 do).
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent * (-math.log(max_period) / (half - downscale_freq_shift))
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Two-layer SiLU MLP on top of a sinusoidal (or concatenated) embedding."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE/DiT 1-D sin-cos table: [sin(pos * w_i), cos(pos * w_i)], w_i = 10000^(-2i/dim)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d_cropped(
    dim: int, grid_h: int, grid_w: int, max_size: int, base_size: int, device=None
) -> torch.Tensor:
    """SD3's 2-D sin-cos positions, shape (grid_h * grid_w, dim), row-major tokens.

    SD3 builds a ``max_size`` x ``max_size`` grid whose coordinates are rescaled so that
    ``base_size`` patches (the training resolution) span the same range as before,
    ``coord = index / (max_size / base_size)``, and centre-crops the grid of the actual
    input. Half the channels encode the column, half the row (column first, as MAE's
    meshgrid "xy" convention gives). Computed directly for the crop, in float64.
    """
    if grid_h > max_size or grid_w > max_size:
        raise ValueError(f"latent grid {grid_h}x{grid_w} exceeds pos_embed_max_size={max_size}")
    top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
    step = max_size / base_size
    rows = torch.arange(top, top + grid_h, dtype=torch.float32, device=device) / step
    cols = torch.arange(left, left + grid_w, dtype=torch.float32, device=device) / step
    emb_cols = sincos_1d(dim // 2, cols)[None, :, :].expand(grid_h, grid_w, dim // 2)
    emb_rows = sincos_1d(dim // 2, rows)[:, None, :].expand(grid_h, grid_w, dim // 2)
    return torch.cat([emb_cols, emb_rows], dim=-1).reshape(grid_h * grid_w, dim).float()


# --------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention`` (flash on GPUs).

    * self/cross attention: ``forward(x, context=None, mask=None)``;
    * joint attention (MMDiT): ``joint(x, c)`` with separate projections for the second
      stream (``add_q_proj``/``add_k_proj``/``add_v_proj``/``to_add_out``) and one softmax
      over the concatenated sequence [x; c] (Esser et al. 2024, SD3 § 4).

    ``qk_norm``: RMSNorm per head on q and k (seed 002, "SD3: QK-normalization"; seed 001
    § 12.1). It bounds every logit by sqrt(head_dim) * max|w_q| * max|w_k| whatever the
    scale of the input, which prevents softmax saturation ("attention logit growth").

    Diagnostics: with ``record_max_logit`` set, each call also records the largest logit
    q.k/sqrt(d) of the first sample, over at most ``diag_max_queries`` strided queries and
    all keys (so the cost is a small fraction of the attention itself). Off by default:
    the fast path does nothing extra.
    """

    diag_max_queries = 256

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        kv_dim: int | None = None,
        bias: bool = False,
        out_bias: bool = True,
        qk_norm: bool = False,
        eps: float = 1e-6,
        context_dim: int | None = None,
        context_pre_only: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.scale = head_dim**-0.5
        kv_dim = kv_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.norm_q = RMSNorm(head_dim, eps) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias)])
        self.is_joint = context_dim is not None
        if self.is_joint:
            self.add_q_proj = nn.Linear(context_dim, inner, bias=True)
            self.add_k_proj = nn.Linear(context_dim, inner, bias=True)
            self.add_v_proj = nn.Linear(context_dim, inner, bias=True)
            self.norm_added_q = RMSNorm(head_dim, eps) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim, eps) if qk_norm else None
            # The last SD3 block discards the text stream, so it has no text output proj.
            self.to_add_out = None if context_pre_only else nn.Linear(inner, context_dim)
        self.record_max_logit = False
        self.max_logit: torch.Tensor | None = None

    def _split(self, t: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """(B, N, H*D) -> (B, H, N, D), QK-normalised first, while the view is still
        contiguous (a norm of the transposed view would copy it)."""
        b, n, _ = t.shape
        t = t.view(b, n, self.heads, self.head_dim)
        if norm is not None:
            t = norm(t)
        return t.transpose(1, 2)

    def _attend(self, q, k, v, mask=None) -> torch.Tensor:
        if self.record_max_logit:
            self._record_max_logit(q, k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)

    @torch.no_grad()
    def _record_max_logit(self, q: torch.Tensor, k: torch.Tensor) -> None:
        q1 = q[:1]
        stride = max(1, math.ceil(q1.shape[2] / self.diag_max_queries))
        logits = torch.matmul(q1[:, :, ::stride].float(), k[:1].float().transpose(-1, -2))
        largest = logits.amax() * self.scale
        self.max_logit = largest if self.max_logit is None else torch.maximum(self.max_logit, largest)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kv = x if context is None else context
        q = self._split(self.to_q(x), self.norm_q)
        k = self._split(self.to_k(kv), self.norm_k)
        v = self._split(self.to_v(kv), None)
        return self.to_out[0](self._attend(q, k, v, mask))

    def joint(
        self, x: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = x.shape[1]
        k = torch.cat(
            [self._split(self.to_k(x), self.norm_k), self._split(self.add_k_proj(c), self.norm_added_k)],
            dim=2,
        )
        v = torch.cat([self._split(self.to_v(x), None), self._split(self.add_v_proj(c), None)], dim=2)
        q_x = self._split(self.to_q(x), self.norm_q)
        if self.to_add_out is None:
            # Last block: the text stream's outputs are discarded, so its queries are never
            # needed; each query row of attention is independent, so attending with the image
            # queries alone gives the image stream exactly what the joint call would. The
            # text query projection (kept: it is in SD3's layout) runs on zero tokens and joins
            # the graph through their (exactly zero) sum, so it still gets its exactly-zero
            # gradient, as in the reference, rather than none (which trips up some engines).
            unused = self._split(self.add_q_proj(c[:, :0]), self.norm_added_q).sum()
            return self.to_out[0](self._attend(q_x, k, v) + unused), None
        q = torch.cat([q_x, self._split(self.add_q_proj(c), self.norm_added_q)], dim=2)
        out = self._attend(q, k, v)
        return self.to_out[0](out[:, :n]), self.to_add_out(out[:, n:])


# --------------------------------------------------------------------------- feed-forward


class _ProjAct(nn.Module):
    """Input projection + activation, named like diffusers' GELU/GEGLU/SwiGLU (``.proj``).

    Gated variants (Shazeer 2020; seed 001 § 12.2): proj -> [a, gate], out = a * act(gate),
    value half first as diffusers does.
    """

    def __init__(self, dim_in: int, dim_out: int, kind: MLPKind):
        super().__init__()
        self.kind = kind
        gated = kind in ("geglu", "swiglu")
        self.proj = nn.Linear(dim_in, dim_out * (2 if gated else 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if self.kind == "gelu_tanh":
            return F.gelu(h, approximate="tanh")
        if self.kind == "gelu":
            return F.gelu(h)
        a, gate = h.chunk(2, dim=-1)
        return a * (F.gelu(gate) if self.kind == "geglu" else F.silu(gate))


def mlp_hidden_dim(dim: int, ratio: float, kind: MLPKind) -> int:
    """Hidden width; gated MLPs get 2/3 of it (rounded up to 8) so params stay ~2*ratio*D^2."""
    hidden = int(dim * ratio)
    if kind == "swiglu":
        hidden = 8 * math.ceil(2 * hidden / 3 / 8)
    return hidden


class FeedForward(nn.Module):
    """``net.0.proj`` -> activation -> ``net.2``, the layout of diffusers' FeedForward."""

    def __init__(self, dim: int, hidden_dim: int, kind: MLPKind):
        super().__init__()
        self.net = nn.ModuleList([_ProjAct(dim, hidden_dim, kind), nn.Identity(), nn.Linear(hidden_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


# --------------------------------------------------------------------------- modulation


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero (DiT, Peebles & Xie 2023; seed 001 § 11.2).

    One linear map of the (already SiLU-activated) conditioning vector gives shift, scale and
    gate for the attention branch and for the MLP branch. With ``zero_init`` the linear map
    starts at zero, so every gate is 0 and the whole block is exactly the identity at
    initialisation (seed 001 § 10.3).
    """

    def __init__(self, dim: int, norm: NormKind = "layernorm", eps: float = 1e-6, zero_init: bool = True):
        super().__init__()
        self.linear = Linear(dim, 6 * dim, zero_init=zero_init)
        self.norm = make_norm(norm, dim, eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        mod = self.linear(cond).unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        return modulate(self.norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(nn.Module):
    """AdaLN without gates (SD3's final layer and last text-stream norm): (scale, shift)."""

    def __init__(self, dim: int, norm: NormKind = "layernorm", eps: float = 1e-6, zero_init: bool = True):
        super().__init__()
        self.linear = Linear(dim, 2 * dim, zero_init=zero_init)
        self.norm = make_norm(norm, dim, eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(cond).unsqueeze(1).chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)


class LayerScale(nn.Module):
    """Per-channel learnable residual scale initialised small (CaiT, Touvron et al. 2021;
    seed 001 § 10.2). Folds exactly into the preceding linear layer on export."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def time_condition(
    h: torch.Tensor,
    temb: torch.Tensor,
    norm: nn.GroupNorm,
    mode: Literal["additive", "scale_shift"],
) -> torch.Tensor:
    """Inject the projected time embedding into a ResBlock (seed 001 § 2.2.3).

    additive (DDPM, SDXL): GN(h + e(t)), a per-channel bias.
    scale_shift (AdaGN, ADM / FiLM): GN(h) * (1 + s(t)) + b(t) with [s, b] = e(t), which
    controls each channel's scale as well as its mean.
    """
    temb = temb[:, :, None, None]
    if mode == "additive":
        return norm(h + temb)
    scale, shift = temb.chunk(2, dim=1)
    return modulate(norm(h), shift, scale)
