"""Sampler mechanics: equivalences, guidance, determinism, grids, construction."""

from __future__ import annotations

import math

import pytest
import torch

from scaletrain.diffusion import DiffusionConfig, build_sampler, classifier_free_guidance
from scaletrain.diffusion.samplers import (
    DDIMSampler,
    DPM2Sampler,
    EulerSampler,
    FlowEulerSampler,
    FlowHeunSampler,
    ancestral_step,
)

SHAPE = (6, 4, 8, 8)


def toy_model(x, t, cond):
    """A deterministic, cond- and t-dependent stand-in for a network."""
    scale = 0.5 + 0.4 * torch.tanh(t / 500).reshape(-1, 1, 1, 1)
    return scale * x + cond["pooled"][:, :4].reshape(-1, 4, 1, 1) * 0.3


def _cond(b=SHAPE[0], value=None):
    g = torch.Generator().manual_seed(11)
    pooled = torch.randn(b, 8, generator=g) if value is None else torch.full((b, 8), value)
    return {"pooled": pooled}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_euler_equals_ddim_on_the_same_grid():
    """DDIM is Euler in the VE variables (Song et al. 2021 sec. 4.3); with eta = 1 both are
    ancestral DDPM steps: two independently written updates must agree."""
    for kind in ("eps", "v"):
        cfg = DiffusionConfig(objective=kind)
        for eta in (0.0, 1.0):
            ddim = build_sampler(cfg, "ddim", steps=12, eta=eta, guidance_scale=1.0)
            euler = build_sampler(cfg, "euler", steps=12, eta=eta, guidance_scale=1.0)
            a = ddim(toy_model, SHAPE, _cond(), generator=_gen())
            b = euler(toy_model, SHAPE, _cond(), generator=_gen())
            assert torch.allclose(a, b, atol=1e-4), (kind, eta)


@pytest.mark.parametrize(
    ("overrides", "name", "eta"),
    [
        (dict(), "ddim", 0.0),
        (dict(), "ddim", 0.7),
        (dict(objective="v", zero_terminal_snr=True), "euler", 1.0),
        (dict(karras_sigmas=True), "dpm2", 0.0),
        (dict(objective="flow"), "euler", 0.0),
        (dict(objective="flow", shift=3.0), "heun", 0.0),
    ],
)
def test_deterministic_under_a_seed(overrides, name, eta):
    sampler = build_sampler(
        DiffusionConfig(**overrides), name, steps=6, eta=eta, guidance_scale=3.0
    )
    uncond = _cond(value=0.0)
    a = sampler(toy_model, SHAPE, _cond(), uncond, generator=_gen(1))
    b = sampler(toy_model, SHAPE, _cond(), uncond, generator=_gen(1))
    c = sampler(toy_model, SHAPE, _cond(), uncond, generator=_gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all() and a.shape == SHAPE
    # The validation loop's call shape: sample(model_fn, noise, cond, uncond, generator).
    assert torch.equal(sampler(toy_model, SHAPE, _cond(), uncond, _gen(1)), a)


def test_stochastic_sampler_noise_comes_from_the_generator():
    sampler = build_sampler(DiffusionConfig(), "ddim", steps=6, eta=1.0, guidance_scale=1.0)
    x_T = torch.randn(SHAPE, generator=_gen(0))
    a = sampler(toy_model, x_T, _cond(), generator=_gen(1))
    b = sampler(toy_model, x_T, _cond(), generator=_gen(2))
    assert not torch.allclose(a, b)  # same start, different ancestral noise
    deterministic = build_sampler(DiffusionConfig(), "ddim", steps=6, eta=0.0, guidance_scale=1.0)
    assert torch.equal(
        deterministic(toy_model, x_T, _cond(), generator=_gen(1)),
        deterministic(toy_model, x_T, _cond(), generator=_gen(2)),
    )


@pytest.mark.parametrize("objective", ["eps", "flow"])
def test_guidance_scale_one_is_the_conditional_model(objective):
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return toy_model(x, t, cond)

    sampler = build_sampler(DiffusionConfig(objective=objective), steps=5, guidance_scale=1.0)
    x_T = torch.randn(SHAPE, generator=_gen(0))
    plain = sampler(model, x_T, _cond(), None)
    with_uncond = sampler(model, x_T, _cond(), _cond(value=123.0))
    assert torch.equal(plain, with_uncond)
    assert set(calls) == {SHAPE[0]}  # never the doubled CFG batch


@pytest.mark.parametrize(("objective", "name"), [("v", "ddim"), ("flow", "heun")])
def test_guided_sampling_equals_manual_guidance(objective, name):
    """The batched cond/uncond call combines exactly as uncond + w (cond - uncond), with the
    optional rescale, at every step."""
    scale, rescale = 4.0, 0.6
    cond, uncond = _cond(), _cond(value=-0.5)

    def manual(x, t, _):
        return classifier_free_guidance(
            toy_model(x, t, cond), toy_model(x, t, uncond), scale, rescale
        )

    cfg = DiffusionConfig(objective=objective)
    x_T = torch.randn(SHAPE, generator=_gen(0))
    guided = build_sampler(cfg, name, steps=5, guidance_scale=scale, guidance_rescale=rescale)
    reference = build_sampler(cfg, name, steps=5, guidance_scale=1.0)
    assert torch.allclose(
        guided(toy_model, x_T, cond, uncond), reference(manual, x_T, cond), atol=1e-5
    )
    # and guidance changes the result
    assert not torch.allclose(guided(toy_model, x_T, cond, uncond), reference(toy_model, x_T, cond))


def test_single_row_cond_is_broadcast_and_errors_are_clear():
    sampler = build_sampler(DiffusionConfig(), steps=3, guidance_scale=2.0)
    one = {"pooled": torch.ones(1, 8)}
    x = sampler(toy_model, SHAPE, one, {"pooled": torch.zeros(1, 8)}, generator=_gen())
    assert x.shape == SHAPE
    with pytest.raises(ValueError, match="needs an uncond"):
        sampler(toy_model, SHAPE, one, None, generator=_gen())
    with pytest.raises(ValueError, match="same keys"):
        sampler(toy_model, SHAPE, one, {"time_ids": torch.zeros(1, 6)}, generator=_gen())
    with pytest.raises(ValueError, match="rows"):
        sampler(toy_model, SHAPE, {"pooled": torch.ones(4, 8)}, one, generator=_gen())


def test_flow_euler_single_step_returns_the_x0_prediction():
    sampler = build_sampler(DiffusionConfig(objective="flow"), "euler", steps=1, guidance_scale=1.0)
    x_T = torch.randn(SHAPE, generator=_gen(0))
    seen = []

    def model(x, t, cond):
        seen.append(t.clone())
        return toy_model(x, t, cond)

    out = sampler(model, x_T, _cond())
    assert torch.equal(seen[0], torch.full((SHAPE[0],), 1000.0))  # t = 1 -> 1000 (SD3)
    assert torch.allclose(out, x_T - toy_model(x_T, seen[0], _cond()))  # x0 = x_1 - v


def test_flow_grid_uses_the_resolution_shift():
    sampler = build_sampler(DiffusionConfig(objective="flow", shift_auto_base=32), "euler")
    base = sampler.grid(4, torch.Size([1, 4, 32, 32]))
    big = sampler.grid(4, torch.Size([1, 4, 64, 64]))
    assert base == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert big == pytest.approx([2 * t / (1 + t) for t in base])


def test_karras_grid():
    cfg = DiffusionConfig(karras_sigmas=True)
    sampler = build_sampler(cfg, "euler", steps=10)
    sigmas, ts = sampler.grid(10)
    sched = sampler.schedule
    assert len(sigmas) == 11 and sigmas[-1] == 0.0 and len(ts) == 10
    assert sigmas[0] == pytest.approx(float(sched.sigma(999))) and ts[0] == pytest.approx(999)
    assert sigmas[-2] == pytest.approx(float(sched.sigma(0))) and ts[-1] == pytest.approx(
        0, abs=1e-9
    )
    # Karras et al. 2022 eq. 5: sigma^(1/rho) is evenly spaced.
    roots = torch.tensor(sigmas[:-1]) ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[0].expand(9), rtol=1e-6)
    assert torch.allclose(
        sched.sigma(torch.tensor(ts)), torch.tensor(sigmas[:-1], dtype=torch.float64)
    )
    zt = build_sampler(
        DiffusionConfig(objective="v", zero_terminal_snr=True, karras_sigmas=True), "euler"
    )
    zs, zts = zt.grid(10)
    assert math.isinf(zs[0]) and zts[0] == 999 and math.isfinite(zs[1])


def test_build_sampler_choices():
    assert isinstance(build_sampler(DiffusionConfig()), DDIMSampler)
    assert isinstance(build_sampler(DiffusionConfig(objective="flow")), FlowEulerSampler)
    assert isinstance(
        build_sampler(DiffusionConfig(objective="flow", sampler="heun")), FlowHeunSampler
    )
    assert isinstance(build_sampler(DiffusionConfig(), "euler"), EulerSampler)
    assert isinstance(build_sampler(DiffusionConfig(), "dpm2"), DPM2Sampler)
    s = build_sampler(DiffusionConfig(sample_steps=7, guidance_scale=3.0, eta=0.5))
    assert (s.steps, s.guidance_scale, s.eta) == (7, 3.0, 0.5)
    assert build_sampler(DiffusionConfig(), steps=9, guidance_scale=1.5).steps == 9
    with pytest.raises(ValueError, match="not available"):
        build_sampler(DiffusionConfig(objective="flow"), "ddim")
    with pytest.raises(ValueError, match="not available"):
        build_sampler(DiffusionConfig(), "heun")
    with pytest.raises(ValueError, match="eta"):
        build_sampler(DiffusionConfig(), "dpm2", eta=1.0)


def test_ancestral_step():
    sigma, sigma_next = 3.0, 1.2
    posterior = sigma_next * math.sqrt(1 - sigma_next**2 / sigma**2)  # DDPM, eta = 1
    assert ancestral_step(sigma, sigma_next, 0.0) == (sigma_next, 0.0)
    for eta in (0.3, 1.0):
        down, up = ancestral_step(sigma, sigma_next, eta)
        assert up == pytest.approx(eta * posterior)
        assert down**2 + up**2 == pytest.approx(sigma_next**2)
    assert ancestral_step(math.inf, sigma_next, 1.0) == (pytest.approx(0.0), sigma_next)
    assert ancestral_step(sigma, sigma_next, 5.0)[1] == sigma_next  # capped
    # and the sampler uses its eta
    cfg = DiffusionConfig()
    outs = [
        build_sampler(cfg, "euler", steps=6, eta=eta, guidance_scale=1.0)(
            toy_model, SHAPE, _cond(), generator=_gen(3)
        )
        for eta in (0.0, 0.5, 1.0)
    ]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
