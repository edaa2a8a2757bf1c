"""eps / x0 / v / flow-velocity targets and the conversions between them."""

from __future__ import annotations

import itertools

import pytest
import torch

from scaletrain.diffusion.parameterization import (
    PREDICTION_KINDS,
    convert_prediction,
    target_from_x0_eps,
    x0_eps_from_prediction,
)


def _points(process: str, n: int = 64):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    if process == "vp":
        a, b = torch.cos(t * torch.pi / 2), torch.sin(t * torch.pi / 2)  # a^2 + b^2 = 1
    else:
        a, b = 1 - t, t  # rectified flow
    x0 = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    x_t = a.reshape(-1, 1, 1, 1) * x0 + b.reshape(-1, 1, 1, 1) * eps
    return a, b, x0, eps, x_t


def test_targets_are_the_published_definitions():
    a, b, x0, eps, _ = _points("vp")
    a4, b4 = a.reshape(-1, 1, 1, 1), b.reshape(-1, 1, 1, 1)
    assert torch.equal(target_from_x0_eps(x0, eps, a, b, "eps"), eps)
    assert torch.equal(target_from_x0_eps(x0, eps, a, b, "x0"), x0)
    # Salimans & Ho 2022 eq. (v = alpha eps - sigma x): and x0 = alpha z - sigma v for VP.
    v = target_from_x0_eps(x0, eps, a, b, "v")
    assert torch.allclose(v, a4 * eps - b4 * x0)
    x_t = a4 * x0 + b4 * eps
    assert torch.allclose(a4 * x_t - b4 * v, x0)
    # Rectified flow: the velocity dx_t/dt of x_t = (1-t) x0 + t eps is eps - x0 (SD3 eq. 3).
    assert torch.equal(target_from_x0_eps(x0, eps, a, b, "flow"), eps - x0)


@pytest.mark.parametrize("process", ["vp", "flow"])
@pytest.mark.parametrize("kind", PREDICTION_KINDS)
def test_prediction_recovers_x0_and_eps(process, kind):
    a, b, x0, eps, x_t = _points(process)
    target = target_from_x0_eps(x0, eps, a, b, kind)
    x0_hat, eps_hat = x0_eps_from_prediction(target, x_t, a, b, kind)
    assert torch.allclose(x0_hat, x0, atol=1e-9)
    assert torch.allclose(eps_hat, eps, atol=1e-9)


@pytest.mark.parametrize("process", ["vp", "flow"])
@pytest.mark.parametrize(("src", "dst"), list(itertools.permutations(PREDICTION_KINDS, 2)))
def test_conversions_round_trip(process, src, dst):
    a, b, x0, eps, x_t = _points(process)
    pred = target_from_x0_eps(x0, eps, a, b, src)
    converted = convert_prediction(pred, x_t, a, b, src, dst)
    assert torch.allclose(converted, target_from_x0_eps(x0, eps, a, b, dst), atol=1e-9)
    back = convert_prediction(converted, x_t, a, b, dst, src)
    assert torch.allclose(back, pred, atol=1e-9)
    # Also for an arbitrary (wrong) prediction: the maps are mutually inverse everywhere.
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1), dtype=x_t.dtype)
    there = convert_prediction(noise, x_t, a, b, src, dst)
    assert torch.allclose(convert_prediction(there, x_t, a, b, dst, src), noise, atol=1e-8)


def test_v_at_zero_snr_is_minus_x0():
    # At alpha = 0 (zero terminal SNR) v = -x0, so a v-model still predicts the data there.
    x0 = torch.randn(2, 4)
    x_t = torch.randn(2, 4)  # = eps at a = 0
    x0_hat, eps_hat = x0_eps_from_prediction(-x0, x_t, 0.0, 1.0, "v")
    assert torch.allclose(x0_hat, x0) and torch.allclose(eps_hat, x_t)
