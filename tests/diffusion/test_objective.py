"""Training objectives: forward marginals, targets, timesteps, weights, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from scaletrain.diffusion import DiffusionConfig, build_objective, build_schedule
from scaletrain.diffusion.objectives import TimePoints
from scaletrain.diffusion.parameterization import target_from_x0_eps

MU, STD = 0.7, 1.3


def _batch(b=16, shape=(4, 16, 16), seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    batch = {"latents": MU + STD * torch.randn(b, *shape, generator=g)}
    batch.update(extra)
    return batch


def _coefs(cfg, model_t):
    """(a, b) from the model timestep, by the documented convention."""
    if cfg.objective == "flow":
        t = model_t.double() / 1000
        return 1 - t, t
    return build_schedule(cfg).alpha_sigma(model_t.double())


class Recorder:
    """A model_fn that records what it is given and returns a fixed prediction."""

    def __init__(self, output=None):
        self.output = output
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((x.clone(), t.clone(), dict(cond)))
        return torch.zeros_like(x) if self.output is None else self.output(x, t, cond)


# ------------------------------------------------------------------ forward marginal


@pytest.mark.parametrize(
    "overrides",
    [dict(objective="eps"), dict(objective="v", zero_terminal_snr=True), dict(objective="flow")],
)
def test_forward_marginal_matches_closed_form(overrides):
    """x_t = a x0 + b eps with x0 ~ N(mu, s^2) is N(a mu, a^2 s^2 + b^2) (Ho et al. 2020 eq. 4;
    SD3 eq. 3 for flow), checked at fixed times on 200k draws each."""
    cfg = DiffusionConfig(**overrides)
    objective = build_objective(cfg)
    unit = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.9999], dtype=torch.float64)
    points = objective.time_points(unit, torch.Size([5, 1, 8, 8]))
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = MU + STD * torch.randn(5, n, generator=g, dtype=torch.float64)
    eps = torch.randn(5, n, generator=g, dtype=torch.float64)
    x_t, _ = objective.noised(x0, eps, points)
    a, b = points.a, points.b
    if cfg.objective == "flow":
        assert torch.allclose(a, 1 - unit) and torch.allclose(b, unit)
    else:
        ab = build_schedule(cfg).alphas_cumprod[points.model.long()]
        assert torch.allclose(a, ab.sqrt()) and torch.allclose(b, (1 - ab).sqrt())
    var = a**2 * STD**2 + b**2
    assert torch.allclose(x_t.mean(1), a * MU, atol=5 * float(var.max().sqrt()) / math.sqrt(n))
    assert torch.allclose(x_t.var(1), var, rtol=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("objective_name", ["eps", "v", "x0", "flow"])
def test_call_noises_latents_by_the_marginal_at_the_model_timestep(objective_name):
    """End to end through __call__: each sample's x_t has the mean and variance of the
    marginal at the timestep the model is told (so noise level and timestep agree)."""
    cfg = DiffusionConfig(objective=objective_name)
    rec = Recorder()
    build_objective(cfg)(rec, _batch(b=24, shape=(4, 64, 64)), torch.Generator().manual_seed(3))
    ((x_t, model_t, _),) = rec.calls
    a, b = _coefs(cfg, model_t)
    var = (a**2 * STD**2 + b**2).float()
    n = x_t[0].numel()
    assert torch.allclose(
        x_t.flatten(1).mean(1), (a * MU).float(), atol=5 * float(var.max().sqrt()) / n**0.5
    )
    assert torch.allclose(x_t.flatten(1).var(1), var, rtol=5 * (2 / n) ** 0.5)


def test_zero_terminal_snr_last_timestep_is_pure_noise():
    cfg = DiffusionConfig(objective="v", zero_terminal_snr=True)
    objective = build_objective(cfg)
    points = objective.time_points(torch.tensor([0.99999], dtype=torch.float64), torch.Size([1]))
    assert points.model.item() == 999 and points.a.item() == 0.0
    x0, eps = torch.randn(1, 10), torch.randn(1, 10)
    x_t, target = objective.noised(x0, eps, points)
    assert torch.equal(x_t, eps)
    assert torch.allclose(target, -x0)  # v = a eps - b x0 = -x0


# ------------------------------------------------------------------ targets and losses


def _oracle(cfg, x0, kind):
    """Knows x0; recovers eps from x_t and the timestep; predicts `kind` exactly."""

    def model_fn(x_t, model_t, cond):
        a, b = _coefs(cfg, model_t)
        a4, b4 = a.reshape(-1, 1, 1, 1).float(), b.reshape(-1, 1, 1, 1).float()
        eps = (x_t - a4 * x0) / b4
        return target_from_x0_eps(x0, eps, a, b, kind)

    return model_fn


@pytest.mark.parametrize(
    ("objective_name", "weighting"),
    [
        ("eps", "uniform"),
        ("eps", "min_snr"),
        ("v", "min_snr"),
        ("x0", "uniform"),
        ("flow", "uniform"),
        ("flow", "logit_normal"),
        ("flow", "min_snr"),
    ],
)
def test_exact_prediction_has_zero_loss_and_wrong_target_does_not(objective_name, weighting):
    cfg = DiffusionConfig(
        objective=objective_name, loss_weighting=weighting, timestep_sampling="uniform"
    )
    objective = build_objective(cfg)
    batch = _batch()
    x0 = batch["latents"]
    loss, logs = objective(
        _oracle(cfg, x0, objective_name), batch, torch.Generator().manual_seed(0)
    )
    assert loss.shape == (16,) and loss.dtype == torch.float32
    assert float(loss.max()) < 1e-6 * float(x0.square().mean())
    wrong = {"eps": "x0", "v": "eps", "x0": "eps", "flow": "v"}[objective_name]
    loss, logs = objective(_oracle(cfg, x0, wrong), batch, torch.Generator().manual_seed(0))
    assert float(logs["loss_unweighted"].mean()) > 0.05


def test_loss_is_weight_times_per_sample_mse():
    cfg = DiffusionConfig(objective="v", loss_weighting="min_snr", min_snr_gamma=5.0)
    batch = _batch(b=32)
    rec = Recorder()
    loss, logs = build_objective(cfg)(rec, batch, torch.Generator().manual_seed(1))
    ((x_t, model_t, _),) = rec.calls
    a, b = _coefs(cfg, model_t)
    a4, b4 = a.reshape(-1, 1, 1, 1).float(), b.reshape(-1, 1, 1, 1).float()
    x0 = batch["latents"]
    eps = (x_t - a4 * x0) / b4
    target = a4 * eps - b4 * x0
    mse = target.square().flatten(1).mean(1)  # the model predicted zeros
    snr = a**2 / b**2
    weight = torch.clamp(snr, max=5.0) / (snr + 1)
    assert torch.allclose(logs["loss_unweighted"], mse, rtol=1e-4)
    assert torch.allclose(logs["loss_weight"].double(), weight, rtol=1e-5)
    assert torch.allclose(loss, (weight * mse).float(), rtol=1e-4)


# ------------------------------------------------------------------ timesteps


def test_discrete_timesteps_are_uniform_integers_and_logged_normalised():
    cfg = DiffusionConfig()
    rec = Recorder()
    objective = build_objective(cfg)
    _, logs = objective(rec, _batch(b=20_000, shape=(1, 1, 1)), torch.Generator().manual_seed(0))
    model_t = rec.calls[0][1]
    assert torch.equal(model_t, model_t.round()) and model_t.min() >= 0 and model_t.max() <= 999
    assert torch.allclose(logs["timesteps"], model_t / 999)
    counts = torch.histc(model_t, bins=10, min=0, max=1000)
    assert bool(((counts - 2000).abs() < 5 * 2000**0.5).all())


def test_flow_logit_normal_timesteps_and_model_convention():
    cfg = DiffusionConfig(
        objective="flow", timestep_sampling="logit_normal", logit_mean=0.3, logit_std=0.7
    )
    rec = Recorder()
    _, logs = build_objective(cfg)(
        rec, _batch(b=20_000, shape=(1, 2, 2)), torch.Generator().manual_seed(0)
    )
    t = logs["timesteps"].double()
    assert torch.allclose(rec.calls[0][1].double(), t * 1000, rtol=1e-6)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.3, abs=5 * 0.7 / 20_000**0.5)
    assert logit.std().item() == pytest.approx(0.7, rel=0.03)


def test_flow_resolution_shift_from_latent_size():
    """shift_auto_base 32: 32x32 latents keep t, 64x64 latents use s = sqrt(64^2/32^2) = 2, so
    the median of uniform draws moves from 0.5 to 2*0.5/(1+0.5) = 2/3."""
    cfg = DiffusionConfig(objective="flow", shift_auto_base=32)
    objective = build_objective(cfg)
    g = torch.Generator().manual_seed(0)
    base = objective.sample_time_points(40_000, torch.Size([40_000, 4, 32, 32]), g).unit
    big = objective.sample_time_points(40_000, torch.Size([40_000, 4, 64, 64]), g).unit
    assert base.median().item() == pytest.approx(0.5, abs=0.01)
    assert big.median().item() == pytest.approx(2 / 3, abs=0.01)
    fixed = build_objective(DiffusionConfig(objective="flow", shift=3.0))
    unit = torch.tensor([0.25, 0.5], dtype=torch.float64)
    assert torch.allclose(
        fixed.time_points(unit, torch.Size([2, 4, 8, 8])).unit, 3 * unit / (1 + 2 * unit)
    )


# ------------------------------------------------------------------ determinism


def test_deterministic_under_a_seed_and_different_each_step():
    cfg = DiffusionConfig(objective="flow", timestep_sampling="logit_normal", cfg_drop_prompt=0.5)
    objective = build_objective(cfg)
    batch = _batch(encoder_hidden_states=torch.ones(16, 3, 8), pooled=torch.ones(16, 8))
    model = lambda x, t, c: x * 0.5 + c["pooled"].mean() * 0.1  # noqa: E731
    loss1, logs1 = objective(model, batch, torch.Generator().manual_seed(42))
    loss2, logs2 = objective(model, batch, torch.Generator().manual_seed(42))
    assert torch.equal(loss1, loss2) and torch.equal(logs1["timesteps"], logs2["timesteps"])
    assert torch.equal(logs1["cfg_dropped_text"], logs2["cfg_dropped_text"])
    g = torch.Generator().manual_seed(42)
    first, _ = objective(model, batch, g)
    second, logs_next = objective(model, batch, g)  # the next step with the same generator
    assert not torch.equal(first, second)
    assert not torch.equal(logs1["timesteps"], logs_next["timesteps"])
    other, _ = objective(model, batch, torch.Generator().manual_seed(43))
    assert not torch.equal(loss1, other)


# ------------------------------------------------------------------ bad input


def test_bad_batches_name_the_problem():
    objective = build_objective(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    with pytest.raises(KeyError, match="latents"):
        objective(Recorder(), {"pooled": torch.zeros(2, 4)}, g)
    with pytest.raises(ValueError, match="pooled"):
        objective(Recorder(), _batch(b=4, pooled=torch.zeros(3, 8)), g)
    with pytest.raises(ValueError, match="does not match"):
        objective(lambda x, t, c: x[:, :2], _batch(b=4), g)


def test_time_points_shapes():
    objective = build_objective(DiffusionConfig())
    points = objective.sample_time_points(
        7, torch.Size([7, 4, 8, 8]), torch.Generator().manual_seed(0)
    )
    assert isinstance(points, TimePoints)
    for value in (points.a, points.b, points.unit, points.model):
        assert value.shape == (7,)
