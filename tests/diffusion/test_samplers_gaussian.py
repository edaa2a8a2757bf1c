"""Samplers against the exact answer for Gaussian data.

For x0 ~ N(mu, s^2) (independently per dimension) and x_t = a x0 + b eps the optimal denoiser is
linear in x_t: with v_t = a^2 s^2 + b^2,
    E[x0 | x_t] = mu + (a s^2 / v_t) (x_t - a mu),   E[eps | x_t] = (b / v_t) (x_t - a mu)
(Gaussian conditioning). Expressed in each parameterisation it is the model a perfectly trained
network converges to, so a correct sampler driven by it must return N(mu, s^2). The probability
flow ODE of this process maps the initial noise x_T = a_T mu + sqrt(v_T) z to exactly
x0 = mu + s z, which lets deterministic samplers be checked sample by sample (no Monte-Carlo
noise): their error must shrink at their order of accuracy as the step count grows.
"""

from __future__ import annotations

import pytest
import torch

from scaletrain.diffusion import DiffusionConfig, build_sampler, build_schedule
from scaletrain.diffusion.parameterization import target_from_x0_eps

MU = torch.tensor([0.5, -1.0, 0.3, 0.0]).reshape(1, 4, 1, 1)
STD = torch.tensor([0.6, 1.5, 0.8, 1.0]).reshape(1, 4, 1, 1)
N = 20_000  # samples per dimension (80k scalars)


def coefficients(cfg: DiffusionConfig):
    """model timestep -> (a, b) of x_t = a x0 + b eps, by the model-timestep convention."""
    schedule = build_schedule(cfg)
    if schedule is None:
        return lambda t: (1 - t.double() / 1000, t.double() / 1000)  # flow passes t * 1000
    return lambda t: schedule.alpha_sigma(
        t.double()
    )  # discrete passes the index (maybe fractional)


def gaussian_model(cfg: DiffusionConfig):
    """The exact denoiser for N(MU, STD^2) data, expressed as a `cfg.objective` prediction."""
    coefs = coefficients(cfg)

    def model_fn(x, t, cond):
        a, b = coefs(t)
        a4, b4 = a.float().reshape(-1, 1, 1, 1), b.float().reshape(-1, 1, 1, 1)
        var = a4**2 * STD**2 + b4**2
        resid = x - a4 * MU
        x0 = MU + a4 * STD**2 / var * resid
        eps = b4 / var * resid
        return target_from_x0_eps(x0, eps, a, b, cfg.objective)

    return model_fn


def initial_noise(cfg: DiffusionConfig, seed: int = 0):
    """(x_T drawn from the exact marginal at the first sampled timestep, the z behind it)."""
    z = torch.randn(N, 4, 1, 1, generator=torch.Generator().manual_seed(seed))
    schedule = build_schedule(cfg)
    if schedule is None:
        a, b = 0.0, 1.0  # flow: t = 1 is pure noise
    else:
        a, b = (float(c) for c in schedule.alpha_sigma(schedule.num_train_timesteps - 1))
    x_T = a * MU + (a**2 * STD**2 + b**2).sqrt() * z
    return x_T, z


def run(cfg: DiffusionConfig, name: str, steps: int, eta: float = 0.0, seed: int = 0):
    x_T, z = initial_noise(cfg, seed)
    sampler = build_sampler(cfg, name, steps=steps, guidance_scale=1.0, eta=eta)
    x = sampler(gaussian_model(cfg), x_T, {}, generator=torch.Generator().manual_seed(seed + 1))
    return x, MU + STD * z  # samples, and where the exact ODE takes each of them


def std_error(x: torch.Tensor) -> float:
    """Largest relative error of the per-dimension std against the data's."""
    return float((x.std(dim=(0, 2, 3)) / STD.flatten() - 1).abs().max())


def assert_mean_matches(x: torch.Tensor) -> None:
    # 5 standard errors of a mean of N draws.
    tol = 5 * STD.flatten() / N**0.5
    assert ((x.mean(dim=(0, 2, 3)) - MU.flatten()).abs() < tol).all(), x.mean(dim=(0, 2, 3))


SECOND_ORDER = [
    # (config, sampler): 30 steps must reproduce mean and std to within 2 %.
    (dict(objective="flow"), "heun"),
    (dict(objective="flow", shift=3.0), "heun"),
    (dict(objective="eps", timestep_spacing="linspace"), "dpm2"),
    (dict(objective="eps", karras_sigmas=True), "dpm2"),
    (dict(objective="v", zero_terminal_snr=True, timestep_spacing="linspace"), "dpm2"),
    (dict(objective="x0", schedule="cosine", timestep_spacing="linspace"), "dpm2"),
    (dict(objective="v", schedule="linear", beta_start=1e-4, beta_end=0.02), "dpm2"),
]


@pytest.mark.parametrize(("overrides", "name"), SECOND_ORDER)
def test_second_order_samplers_reproduce_gaussian_data_in_30_steps(overrides, name):
    cfg = DiffusionConfig(**overrides)
    x, exact = run(cfg, name, steps=30)
    assert_mean_matches(x)
    assert std_error(x) < 0.02
    # Sample by sample close to the exact ODE solution.
    assert float((x - exact).abs().mean()) < 0.02


FIRST_ORDER = [
    (dict(objective="eps"), "ddim", 0.0),
    (dict(objective="eps"), "ddim", 1.0),
    (dict(objective="v", zero_terminal_snr=True), "ddim", 0.0),
    (dict(objective="v", zero_terminal_snr=True), "ddim", 1.0),
    (dict(objective="x0", schedule="cosine"), "ddim", 0.5),
    (dict(objective="eps", karras_sigmas=True), "euler", 0.0),
    (dict(objective="v", zero_terminal_snr=True), "euler", 1.0),
    (dict(objective="flow"), "euler", 0.0),
    (dict(objective="flow", shift=3.0), "euler", 0.0),
]


@pytest.mark.parametrize(("overrides", "name", "eta"), FIRST_ORDER)
def test_first_order_samplers_converge_to_gaussian_data(overrides, name, eta):
    """First-order samplers lose ~5 % of the std at 50 steps on this data (the error of one
    Euler step is O(h^2), N steps O(1/N)); doubling the steps must halve the error, which only
    a sampler converging to the right distribution does."""
    cfg = DiffusionConfig(**overrides)
    x25, exact = run(cfg, name, steps=25, eta=eta)
    x50, _ = run(cfg, name, steps=50, eta=eta)
    assert_mean_matches(x50)
    err25, err50 = std_error(x25), std_error(x50)
    assert err50 < 0.1
    assert 0.3 < err50 / err25 < 0.7, (err25, err50)
    if eta == 0.0:
        d25, d50 = float((x25 - exact).abs().mean()), float((x50 - exact).abs().mean())
        assert 0.35 < d50 / d25 < 0.65, (d25, d50)
