"""SD3 timestep densities (Esser et al. 2024 sec. 3.1) and the resolution shift (sec. 5.3.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scaletrain.diffusion.timesteps import (
    cosmap_density,
    logit_normal_density,
    mode_density,
    resolution_shift,
    sample_unit_timesteps,
    shift_timesteps,
)

N = 400_000


def _draw(kind, **kw):
    return sample_unit_timesteps(kind, N, torch.Generator().manual_seed(0), **kw)


def _histogram(t: torch.Tensor, bins: int = 40):
    hist, edges = np.histogram(t.numpy(), bins=bins, range=(0.0, 1.0), density=True)
    return hist, 0.5 * (edges[1:] + edges[:-1])


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_logit_normal_has_the_stated_mean_and_std_in_logit_space(mean, std):
    t = _draw("logit_normal", logit_mean=mean, logit_std=std)
    assert bool(((t > 0) & (t < 1)).all())
    logit = torch.log(t) - torch.log1p(-t)
    assert logit.mean().item() == pytest.approx(mean, abs=5 * std / math.sqrt(N))
    assert logit.std().item() == pytest.approx(std, rel=0.01)
    # Bin masses: the histogram against the normal CDF in logit space, and the closed-form
    # density (SD3 eq. 19) integrated over each bin against the same.
    edges = torch.linspace(0, 1, 21, dtype=torch.float64)
    z = (torch.logit(edges[1:-1]) - mean) / std
    cdf = torch.cat([torch.zeros(1), 0.5 * (1 + torch.erf(z / math.sqrt(2))), torch.ones(1)])
    mass = cdf.diff().double()
    counts = torch.histc(t, bins=20, min=0.0, max=1.0).double()
    assert bool(((counts - N * mass).abs() <= 5 * (N * mass).sqrt() + 5).all())
    fine = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:-1]
    dens = logit_normal_density(fine, mean, std)
    per_bin = [
        torch.trapezoid(dens[(fine >= lo) & (fine <= hi)], fine[(fine >= lo) & (fine <= hi)])
        for lo, hi in zip(edges[:-1], edges[1:])
    ]
    assert torch.allclose(torch.stack(per_bin), mass, atol=2e-4)


def _mode_reference_density(t: np.ndarray, s: float) -> np.ndarray:
    """-d f^{-1}/dt for f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) (SD3 eq. 20), from a dense
    table of f inverted by interpolation and a central difference: independent of the library's
    bisection and closed-form derivative."""
    u = np.linspace(0.0, 1.0, 200_001)
    f = 1 - u - s * (np.cos(np.pi / 2 * u) ** 2 - 1 + u)

    def inverse(x):
        return np.interp(x, f[::-1], u[::-1])  # f is decreasing

    h = 1e-5
    return -(inverse(t + h) - inverse(t - h)) / (2 * h)


@pytest.mark.parametrize("scale", [1.29, -0.5, 0.0])
def test_mode_sampling_matches_its_density(scale):
    t = _draw("mode", mode_scale=scale)
    assert bool(((t >= 0) & (t <= 1)).all())
    hist, centres = _histogram(t)
    reference = _mode_reference_density(centres, scale)
    assert np.allclose(hist, reference, rtol=0.05)
    assert np.allclose(mode_density(torch.from_numpy(centres), scale).numpy(), reference, rtol=1e-3)
    if scale == 0.0:
        assert np.allclose(reference, 1.0, rtol=1e-3)  # s = 0 is uniform
    if scale > 0:
        assert reference[len(reference) // 2] > 1.2  # mass moves to the middle timesteps


def test_cosmap_sampling_matches_its_density():
    t = _draw("cosmap")
    hist, centres = _histogram(t)
    density = cosmap_density(torch.from_numpy(centres)).numpy()
    assert np.allclose(hist, density, rtol=0.05)
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    assert torch.trapezoid(cosmap_density(grid), grid).item() == pytest.approx(1.0, abs=1e-6)


def test_uniform_and_determinism():
    t = _draw("uniform")
    hist, _ = _histogram(t, bins=20)
    assert np.allclose(hist, 1.0, rtol=0.03)
    again = _draw("uniform")
    assert torch.equal(t, again)
    other = sample_unit_timesteps("uniform", N, torch.Generator().manual_seed(1))
    assert not torch.equal(t, other)


def test_shift_formula():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0):
        shifted = shift_timesteps(t, s)
        assert torch.allclose(shifted, s * t / (1 + (s - 1) * t))
        assert shifted[0].item() == 0.0 and shifted[-1].item() == pytest.approx(1.0)
        assert bool((shifted.diff() > 0).all())
        # Noise-to-signal ratio t/(1-t) scaled by s, i.e. SNR divided by s^2.
        inner = t[1:-1]
        ratio = shift_timesteps(inner, s) / (1 - shift_timesteps(inner, s))
        assert torch.allclose(ratio, s * inner / (1 - inner))
    assert shift_timesteps(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def test_resolution_shift_is_sqrt_of_pixel_ratio():
    assert resolution_shift(128, 128, 1.0, 0) == 1.0  # auto off: the fixed shift
    assert resolution_shift(128, 128, 3.0, 0) == 3.0
    assert resolution_shift(32, 32, 1.0, 32) == pytest.approx(1.0)
    assert resolution_shift(128, 128, 1.0, 32) == pytest.approx(4.0)  # 1024 px vs 256 px
    assert resolution_shift(64, 128, 1.5, 32) == pytest.approx(1.5 * math.sqrt(8))
