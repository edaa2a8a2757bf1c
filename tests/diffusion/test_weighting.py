"""Loss weights: Min-SNR-gamma per target (Hang et al. 2023) and the SD3 density weights."""

from __future__ import annotations

import pytest
import torch

from scaletrain.diffusion import DiffusionConfig, build_schedule
from scaletrain.diffusion.parameterization import target_from_x0_eps, x0_eps_from_prediction
from scaletrain.diffusion.timesteps import cosmap_density, logit_normal_density, mode_density
from scaletrain.diffusion.weighting import loss_weights, min_snr_weight

GAMMA = 5.0
STEPS = torch.tensor([0, 50, 200, 500, 800, 999])


def test_min_snr_matches_the_paper_table_for_eps_v_x0():
    sched = build_schedule(DiffusionConfig())
    snr = sched.snr(STEPS)
    a, b = sched.alpha_sigma(STEPS.double())
    clipped = torch.clamp(snr, max=GAMMA)
    # Hang et al. 2023 sec. 3.4: eps: min(SNR, g)/SNR; v: min(SNR, g)/(SNR + 1); x0: min(SNR, g).
    assert torch.allclose(min_snr_weight(a, b, "eps", GAMMA), clipped / snr)
    assert torch.allclose(min_snr_weight(a, b, "v", GAMMA), clipped / (snr + 1))
    assert torch.allclose(min_snr_weight(a, b, "x0", GAMMA), clipped)
    # Spot values: t = 0 has SNR ~ 1175 so eps weight = 5/SNR; t = 999 has SNR < 5 so 1.
    assert min_snr_weight(a, b, "eps", GAMMA)[0].item() == pytest.approx(GAMMA / snr[0].item())
    assert min_snr_weight(a, b, "eps", GAMMA)[-1].item() == pytest.approx(1.0)


def test_min_snr_for_flow_velocity():
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.99], dtype=torch.float64)
    snr = ((1 - t) / t) ** 2
    assert torch.allclose(
        min_snr_weight(1 - t, t, "flow", GAMMA), torch.clamp(snr, max=GAMMA) * t**2
    )


@pytest.mark.parametrize("kind", ["eps", "v", "x0", "flow"])
def test_min_snr_weighted_loss_equals_clamped_snr_times_x0_loss(kind):
    """The defining property, independent of the per-target algebra: for any prediction error,
    weight * MSE(prediction) == min(SNR, gamma) * MSE(implied x0)."""
    g = torch.Generator().manual_seed(0)
    t = torch.rand(256, generator=g, dtype=torch.float64) * 0.98 + 0.01
    a, b = (1 - t, t) if kind == "flow" else (torch.cos(t * 1.5), torch.sin(t * 1.5))
    x0 = torch.randn(256, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(256, 8, generator=g, dtype=torch.float64)
    x_t = a[:, None] * x0 + b[:, None] * eps
    target = target_from_x0_eps(x0, eps, a, b, kind)
    pred = target + torch.randn(256, 8, generator=g, dtype=torch.float64)
    x0_hat, _ = x0_eps_from_prediction(pred, x_t, a, b, kind)
    snr = a**2 / b**2
    lhs = min_snr_weight(a, b, kind, GAMMA) * (pred - target).square().mean(1)
    rhs = torch.clamp(snr, max=GAMMA) * (x0_hat - x0).square().mean(1)
    assert torch.allclose(lhs, rhs, rtol=1e-9)


def test_min_snr_is_finite_at_zero_terminal_snr():
    sched = build_schedule(DiffusionConfig(objective="v", zero_terminal_snr=True))
    a, b = sched.alpha_sigma(torch.tensor([999.0]))
    assert min_snr_weight(a, b, "v", GAMMA).item() == 0.0  # min(0, g)/(0 + 1)
    assert min_snr_weight(a, b, "x0", GAMMA).item() == 0.0
    assert min_snr_weight(a, b, "eps", GAMMA).item() == 1.0  # the limit of min(SNR, g)/SNR


def test_sd3_density_weights():
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    kw = dict(a=1 - t, b=t, t=t, kind="flow")
    assert torch.equal(loss_weights("uniform", **kw), torch.ones(4, dtype=torch.float64))
    ln = loss_weights("logit_normal", **kw, logit_mean=0.2, logit_std=0.9)
    logit = torch.log(t / (1 - t))
    manual = torch.exp(-((logit - 0.2) ** 2) / (2 * 0.81)) / (
        0.9 * (2 * torch.pi) ** 0.5 * t * (1 - t)
    )
    assert torch.allclose(ln, manual)
    assert torch.allclose(ln, logit_normal_density(t, 0.2, 0.9))
    assert torch.allclose(loss_weights("cosmap", **kw), 2 / (torch.pi * (1 - 2 * t + 2 * t**2)))
    assert torch.allclose(loss_weights("cosmap", **kw), cosmap_density(t))
    assert torch.allclose(loss_weights("mode", **kw, mode_scale=1.29), mode_density(t, 1.29))
    assert torch.allclose(loss_weights("sigma_sqrt", **kw), t**-2)
