"""Training timestep densities on (0, 1) and the resolution-dependent shift (SD3).

Esser et al. 2024 ("Scaling Rectified Flow Transformers", SD3), sec. 3.1: training rectified
flow with t drawn from a density pi(t) instead of U(0, 1) puts more weight on the middle
timesteps, where the velocity is hardest to predict. Each sampler below draws u ~ U(0, 1) from
the caller's generator and maps it, so a seed fixes the draw.
"""

from __future__ import annotations

import math

import torch

# Rectified-flow models are given t * 1000 as their timestep (SD3 / diffusers convention), so
# their timestep embeddings see the same range as a 1000-step discrete model's.
FLOW_TIMESTEP_SCALE = 1000.0


def sample_unit_timesteps(
    kind: str,
    n: int,
    generator: torch.Generator,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """``n`` draws in [0, 1] (float64, on the generator's device) from the named density."""
    device = generator.device
    if kind == "logit_normal":
        # SD3 eq. 19: logit(t) ~ N(m, s^2).
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        return torch.sigmoid(logit_mean + logit_std * z)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    if kind == "uniform":
        return u
    if kind == "mode":
        return mode_map(u, mode_scale)
    if kind == "cosmap":
        # SD3 eq. 21: t = 1 - 1 / (tan(pi u / 2) + 1).
        return 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)
    raise ValueError(f"unknown timestep sampling {kind!r}")


def mode_map(u: torch.Tensor, scale: float) -> torch.Tensor:
    """SD3 eq. 20: f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u). Decreasing in u for
    -1 <= s <= 2/(pi-2); s = 0 is uniform, s > 0 favours the middle timesteps."""
    return 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def logit_normal_density(t: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """pi_ln(t; m, s) = 1/(s sqrt(2 pi)) 1/(t (1-t)) exp(-(logit t - m)^2 / (2 s^2)) (SD3 eq. 19)."""
    t = t.clamp(1e-7, 1 - 1e-7)
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (
        std * math.sqrt(2 * math.pi) * t * (1 - t)
    )


def cosmap_density(t: torch.Tensor) -> torch.Tensor:
    """pi_cosmap(t) = 2 / (pi - 2 pi t + 2 pi t^2) (SD3 eq. 21)."""
    return 2 / (math.pi - 2 * math.pi * t + 2 * math.pi * t**2)


def mode_density(t: torch.Tensor, scale: float, iterations: int = 60) -> torch.Tensor:
    """pi_mode(t; s) = |d f_mode^{-1}(t) / dt| (SD3 eq. 20), by bisection for u = f^{-1}(t)
    (f is decreasing on [0, 1]) and 1/|f'(u)| with f'(u) = -1 - s + s pi/2 sin(pi u)."""
    t = t.double()
    lo = torch.zeros_like(t)
    hi = torch.ones_like(t)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        go_right = mode_map(mid, scale) > t  # f decreasing: f(mid) > t means u > mid
        lo = torch.where(go_right, mid, lo)
        hi = torch.where(go_right, hi, mid)
    u = (lo + hi) / 2
    slope = -1 - scale + scale * math.pi / 2 * torch.sin(math.pi * u)
    return 1 / slope.abs()


def shift_timesteps(t: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """SD3 sec. 5.3.2: t' = s t / (1 + (s - 1) t). Maps [0, 1] onto itself; s > 1 moves mass
    to the noisy end (needed at high resolution, where more pixels keep more signal at equal t).
    Equivalent to scaling the noise-to-signal ratio: t'/(1-t') = s * t/(1-t)."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(height: int, width: int, base_shift: float = 1.0, base_size: int = 0) -> float:
    """The shift for latents of size height x width: ``base_shift`` when ``base_size`` is 0,
    else base_shift * sqrt(m / n) with m = height * width and n = base_size^2 (SD3 sec. 5.3.2:
    s = sqrt(m/n) keeps the SNR of a resolution-m image at t' equal to that at resolution n)."""
    if base_size <= 0:
        return float(base_shift)
    return float(base_shift) * math.sqrt(height * width / base_size**2)
