"""Discrete-time variance-preserving noise schedules.

A schedule is the table alpha_bar_t (t = 0..T-1) of the forward process
q(x_t | x0) = N(a_t x0, s_t^2 I) with a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t)
(Ho et al. 2020, eq. 4). Everything is computed in float64: 1 - alpha_bar near t = 0 and
alpha_bar near t = T-1 lose most of their digits in float32.
"""

from __future__ import annotations

import math

import torch

from scaletrain.diffusion.config import DiffusionConfig


def make_betas(
    kind: str,
    num_timesteps: int,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    cosine_offset: float = 0.008,
) -> torch.Tensor:
    """The betas (float64, shape [T]) of a named schedule."""
    if kind == "linear":  # Ho et al. 2020, sec. 4
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":  # Rombach et al. 2022 (SD, SDXL): linear in sqrt(beta)
        root = torch.linspace(
            math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64
        )
        return root**2
    if kind == "cosine":
        # Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(pi/2 (t/T+s)/(1+s));
        # beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), clipped at 0.999 to avoid the singularity at T.
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + cosine_offset) / (1 + cosine_offset) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {kind!r}; expected linear, scaled_linear or cosine")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Alg. 1: shift and scale sqrt(alpha_bar) so that its last value is 0
    (SNR exactly zero at t = T-1, so training sees pure noise as sampling starts from) and its
    first value is unchanged; return the betas of the rescaled schedule."""
    alpha_bar = torch.cumprod(1 - betas.double(), dim=0)
    root = alpha_bar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


class DiscreteSchedule:
    """alpha_bar table with lookups by (possibly fractional) timestep index."""

    def __init__(self, betas: torch.Tensor):
        betas = betas.double()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-d tensor of length >= 2, got {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.num_train_timesteps = betas.numel()
        # VE noise level sigma_t = s_t / a_t (Karras et al. 2022, sec. 2); +inf at zero SNR.
        ab = self.alphas_cumprod
        self.log_sigmas = 0.5 * (torch.log1p(-ab) - torch.log(ab))

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> DiscreteSchedule:
        betas = make_betas(
            cfg.schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.cosine_offset
        )
        if cfg.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t = alpha_bar_t / (1 - alpha_bar_t) at integer timesteps (float64)."""
        ab = self.alphas_cumprod[t.long().cpu()]
        return ab / (1 - ab)

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t), float64 on CPU, at timestep indices t in [0, T-1].

        Integer t reads the table. Fractional t (Karras-grid samplers) interpolates log sigma
        linearly between neighbours, the inverse of :meth:`timestep_of_sigma`."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        T = self.num_train_timesteps
        if bool(((t < 0) | (t > T - 1)).any()):
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got {t.min()}..{t.max()}")
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo
        ls_lo, ls_hi = self.log_sigmas[lo], self.log_sigmas[hi]
        # where w == 0 take the table value (avoids 0 * inf at zero terminal SNR).
        log_sigma = torch.where(w == 0, ls_lo, (1 - w) * ls_lo + w * ls_hi)
        alpha_bar = torch.sigmoid(-2 * log_sigma)  # 1 / (1 + sigma^2); 0 at sigma = inf
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """VE noise level s_t / a_t at (possibly fractional) timesteps (inf at zero SNR)."""
        a, s = self.alpha_sigma(t)
        return s / a

    def timestep_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose interpolated log sigma equals log(sigma); sigma must lie
        within the finite part of the table. Inverse of :meth:`alpha_sigma`."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        finite = torch.isfinite(self.log_sigmas)
        table = self.log_sigmas[finite]  # increasing in t
        log_sigma = sigma.log()
        if bool(((log_sigma < table[0] - 1e-9) | (log_sigma > table[-1] + 1e-9)).any()):
            raise ValueError("sigma outside the schedule's finite range")
        log_sigma = log_sigma.clamp(table[0], table[-1])
        hi = torch.searchsorted(table, log_sigma).clamp(1, table.numel() - 1)
        lo = hi - 1
        w = (log_sigma - table[lo]) / (table[hi] - table[lo])
        return lo.double() + w

    def inference_timesteps(self, steps: int, spacing: str = "trailing") -> list[int]:
        """The ``steps`` training timesteps a discrete sampler visits, noisiest first.

        trailing: T-1, T-1-T/steps, ...  (Lin et al. 2024 sec. 3.3: always start at T-1);
        linspace: round(linspace(T-1, 0, steps)); leading: k*(T//steps) + 1 for k descending
        (the SD 1.x convention, with its steps_offset of 1; never reaches T-1)."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        if spacing == "trailing":
            ts = [round(T - k * T / steps) - 1 for k in range(steps)]
        elif spacing == "linspace":
            ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        elif spacing == "leading":
            ratio = T // steps
            ts = [min(k * ratio + 1, T - 1) for k in reversed(range(steps))]
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}")
        if len(set(ts)) != len(ts):
            raise ValueError(f"{steps} steps with {spacing} spacing repeat a timestep")
        return ts
