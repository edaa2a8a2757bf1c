"""logSNR(t) of Stable Diffusion's scaled-linear schedule, for the U-Net's skip schedule.

The log-SNR skip gate w(t) = sigmoid(beta * (logSNR(t) - tau)) (seed 001 § 5.2 C) needs the
noise level of the integer timestep the U-Net receives. The model computes it itself rather
than asking the trainer, so the forward signature stays diffusers'. SD/SDXL train with
betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 ("scaled_linear"), alpha_bar(t) =
prod_{s<=t} (1 - beta_s) and SNR(t) = alpha_bar / (1 - alpha_bar) (Ho et al. 2020; Kingma et
al. 2021). Fractional timesteps interpolate logSNR linearly between integer steps.
"""

from __future__ import annotations

import torch


def scaled_linear_log_snr_table(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000
) -> torch.Tensor:
    """logSNR at t = 0 .. num_timesteps-1 (float64, decreasing from ~+7 to ~-5 for SD)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def log_snr_at(timesteps: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """logSNR of (possibly fractional) timesteps, clamped to [0, T-1], float32."""
    t = timesteps.to(torch.float64).clamp(0, table.numel() - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=table.numel() - 1)
    frac = t - lo.to(torch.float64)
    return (table[lo] * (1 - frac) + table[hi] * frac).float()
