"""Per-sample loss weights.

Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy", sec. 3.4): clamp the x0-space loss weight to min(SNR, gamma), so the easy low-noise
timesteps stop dominating the gradient. A prediction error e of kind k maps to an x0 error
c_k e (eps: c = b/a, x0: c = 1, v: c = b/(a^2+b^2), flow velocity: c = b/(a+b)), so the weight on
the MSE of kind k is min(SNR, gamma) c_k^2 with SNR = a^2/b^2. For the VP schedules this gives
the paper's table: eps min(SNR, g)/SNR, v min(SNR, g)/(SNR+1), x0 min(SNR, g); for rectified
flow min(SNR, g) t^2.

SD3 weightings (Esser et al. 2024, sec. 3.1): sampling t from a density pi(t) is, in
expectation, the same as sampling t uniformly and weighting the loss by pi(t); these are the
``logit_normal``, ``mode`` and ``cosmap`` weights. ``sigma_sqrt`` (t^-2) is the extra option
of diffusers' SD3 training script.
"""

from __future__ import annotations

import torch

from scaletrain.diffusion.timesteps import cosmap_density, logit_normal_density, mode_density

# sigma_sqrt weights by t^-2; clamp t so a draw near t = 0 cannot produce an unbounded weight.
SIGMA_SQRT_MIN_T = 1e-3


def min_snr_weight(a: torch.Tensor, b: torch.Tensor, kind: str, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) * c_kind^2, written so that a = 0 (zero terminal SNR) and b = 0 give the
    limits instead of 0/0."""
    a, b = a.double(), b.double()
    if kind == "eps":
        # min(SNR, g)/SNR = min(1, g/SNR) = min(1, g b^2/a^2); -> 1 at SNR = 0.
        snr_c2 = torch.ones_like(a)
        gamma_c2 = gamma * b**2 / a**2
    elif kind == "x0":
        snr_c2 = a**2 / b**2
        gamma_c2 = torch.full_like(a, gamma)
    elif kind == "v":
        norm = (a**2 + b**2) ** 2
        snr_c2 = a**2 / norm
        gamma_c2 = gamma * b**2 / norm
    elif kind == "flow":
        norm = (a + b) ** 2
        snr_c2 = a**2 / norm
        gamma_c2 = gamma * b**2 / norm
    else:
        raise ValueError(f"unknown prediction kind {kind!r}")
    return torch.minimum(snr_c2, gamma_c2)


def loss_weights(
    scheme: str,
    *,
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    kind: str,
    min_snr_gamma: float = 5.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Weights [B] (float64) for the MSE of a ``kind`` prediction at x_t = a x0 + b eps;
    ``t`` is the flow time in [0, 1] (used by the SD3 density weights)."""
    if scheme == "uniform":
        return torch.ones_like(a, dtype=torch.float64)
    if scheme == "min_snr":
        return min_snr_weight(a, b, kind, min_snr_gamma)
    t = t.double()
    if scheme == "logit_normal":
        return logit_normal_density(t, logit_mean, logit_std)
    if scheme == "mode":
        return mode_density(t, mode_scale)
    if scheme == "cosmap":
        return cosmap_density(t)
    if scheme == "sigma_sqrt":
        return t.clamp_min(SIGMA_SQRT_MIN_T) ** -2
    raise ValueError(f"unknown loss weighting {scheme!r}")
