"""Discrete noise schedules: the published formulas, zero terminal SNR, timestep grids."""

from __future__ import annotations

import math

import pytest
import torch

from scaletrain.diffusion import DiffusionConfig, build_schedule
from scaletrain.diffusion.schedules import (
    DiscreteSchedule,
    make_betas,
    rescale_zero_terminal_snr,
)


def test_scaled_linear_is_sd_schedule():
    # SD / SDXL: beta_t = (sqrt(0.00085) + t/(T-1) (sqrt(0.012) - sqrt(0.00085)))^2.
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    mid = (math.sqrt(0.00085) + 500 / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))) ** 2
    assert betas[500].item() == pytest.approx(mid, rel=1e-12)
    # Lin et al. 2024 table 1: SD's terminal sqrt(alpha_bar) = 0.068265, SNR = 0.004682 (not 0).
    ab = torch.cumprod(1 - betas, 0)[-1].item()
    assert math.sqrt(ab) == pytest.approx(0.068265, abs=1e-6)
    assert ab / (1 - ab) == pytest.approx(0.004682, abs=1e-6)


def test_linear_and_cosine_formulas():
    betas = make_betas("linear", 1000, 1e-4, 0.02)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=betas.dtype))
    # Cosine: alpha_bar_t = f(t+1)/f(0) (the table is indexed from the first noised step).
    T, s = 1000, 0.008
    ab = torch.cumprod(1 - make_betas("cosine", T, cosine_offset=s), 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescale(kind):
    betas = make_betas(kind, 1000, 1e-4 if kind == "linear" else 0.00085, 0.02)
    before = torch.cumprod(1 - betas, 0)
    after = DiscreteSchedule(rescale_zero_terminal_snr(betas)).alphas_cumprod
    assert after[-1].item() == 0.0  # exactly: pure noise at t = T-1 (Lin et al. 2024 Alg. 1)
    assert after[0].item() == pytest.approx(before[0].item(), rel=1e-12)
    assert bool((after.diff() < 0).all())  # still strictly decreasing
    # sqrt(alpha_bar) is an affine function of the old one (shift then scale).
    root_old, root_new = before.sqrt(), after.sqrt()
    slope = (root_new[0] - root_new[-1]) / (root_old[0] - root_old[-1])
    assert torch.allclose(root_new, (root_old - root_old[-1]) * slope, atol=1e-12)


def test_from_config_and_snr():
    plain = build_schedule(DiffusionConfig())
    zt = build_schedule(DiffusionConfig(objective="v", zero_terminal_snr=True))
    assert not plain.zero_terminal_snr and zt.zero_terminal_snr
    assert zt.snr(torch.tensor([999])).item() == 0.0
    snr = plain.snr(torch.arange(1000))
    assert bool((snr.diff() < 0).all())
    ab = plain.alphas_cumprod[10].item()
    assert snr[10].item() == pytest.approx(ab / (1 - ab))
    a, b = zt.alpha_sigma(torch.tensor([0.0, 500.0, 999.0]))
    assert torch.allclose(a**2 + b**2, torch.ones(3, dtype=torch.float64))
    assert a[-1].item() == 0.0 and b[-1].item() == 1.0


def test_fractional_timesteps_interpolate_log_sigma_and_invert():
    sched = build_schedule(DiffusionConfig())
    t = torch.tensor([0.0, 10.25, 400.5, 998.9, 999.0], dtype=torch.float64)
    sigma = sched.sigma(t)
    lo, hi = sched.log_sigmas[10], sched.log_sigmas[11]
    assert sigma[1].log().item() == pytest.approx((0.75 * lo + 0.25 * hi).item(), rel=1e-12)
    assert torch.allclose(sched.timestep_of_sigma(sigma), t, atol=1e-9)
    with pytest.raises(ValueError, match="timesteps must lie"):
        sched.alpha_sigma(torch.tensor([1000.0]))


def test_inference_timesteps():
    sched = build_schedule(DiffusionConfig())
    trailing = sched.inference_timesteps(30, "trailing")
    assert trailing[0] == 999 and len(trailing) == 30 and trailing == sorted(trailing)[::-1]
    assert trailing == [round(1000 - k * 1000 / 30) - 1 for k in range(30)]
    linspace = sched.inference_timesteps(30, "linspace")
    assert linspace[0] == 999 and linspace[-1] == 0
    leading = sched.inference_timesteps(50, "leading")
    assert leading[0] == 981 and leading[-1] == 1  # the SD 1.x grid that misses T-1
    assert sched.inference_timesteps(1000, "trailing") == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        sched.inference_timesteps(1001, "trailing")
