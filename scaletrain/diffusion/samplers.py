"""Samplers: from noise to x0 with a trained ``model_fn``, with classifier-free guidance.

    sampler = build_sampler(cfg)                       # scaletrain.diffusion
    x0 = sampler(model_fn, (B, C, H, W), cond, uncond, generator)   # config defaults
    x0 = sampler(model_fn, x_T, cond, uncond, generator, guidance_scale=7.0, steps=50)

All samplers view the process as x_t = a x0 + b eps and, at each step, turn the (guided)
prediction into (x0_hat, eps_hat) (parameterization.py). Then:

* DDIM (Song et al. 2021, eq. 12): x_prev = a' x0_hat + sqrt(b'^2 - s^2) eps_hat + s z with
  s = eta * (b'/b) * sqrt(1 - a^2/a'^2) (eq. 16); eta = 0 is deterministic, eta = 1 is DDPM.
* Euler, discrete (Karras et al. 2022, Alg. 1 without churn; "Euler ancestral" for eta > 0 as
  in k-diffusion): Euler steps of the probability-flow ODE in the VE variables x/a and
  sigma = b/a, where dx/dsigma = eps_hat, so a step is x_next/a' = x0_hat + sigma' eps_hat. On
  the same timestep grid this is exactly DDIM with eta = 0 (Song et al. 2021 sec. 4.3); its
  use is the Karras sigma grid (fractional timesteps, log-sigma interpolation).
* DPM-Solver-2, discrete (Lu et al. 2022): second order, the slope at the log-sigma midpoint.
* Flow Euler / Heun (SD3): the ODE dx/dt = v(x, t) = eps - x0 from t = 1 to 0 on a uniform grid
  put through the resolution shift; Heun is Karras et al. 2022 Alg. 1's second-order
  correction (last step Euler, to not evaluate the model at t = 0).

Starting at zero terminal SNR (a = 0) is exact for all of them (Lin et al. 2024).
Randomness (initial noise from a shape, ancestral noise) comes only from ``generator``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from scaletrain.diffusion.conditioning import ModelFn
from scaletrain.diffusion.guidance import classifier_free_guidance
from scaletrain.diffusion.parameterization import convert_prediction, x0_eps_from_prediction
from scaletrain.diffusion.schedules import DiscreteSchedule
from scaletrain.diffusion.timesteps import (
    FLOW_TIMESTEP_SCALE,
    resolution_shift,
    shift_timesteps,
)

KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


def _gaussian(shape: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma to sigma_next (VE noise levels;
    k-diffusion ``get_ancestral_step``): step deterministically to sigma_down, then add fresh
    noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2. eta = 1 adds the
    DDPM posterior's noise, sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2."""
    if eta == 0:
        return sigma_next, 0.0
    ratio = 1.0 if math.isinf(sigma) else 1 - sigma_next**2 / sigma**2
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(ratio, 0.0)))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


class GuidedModel:
    """The model with CFG applied: ``predict(x, t) -> guided prediction`` (float32).

    Conditional and unconditional rows go through the model in one call (batch 2B). With
    guidance scale 1 the unconditional branch is never evaluated."""

    def __init__(
        self,
        model_fn: ModelFn,
        cond: Mapping[str, torch.Tensor],
        uncond: Mapping[str, torch.Tensor] | None,
        batch_size: int,
        scale: float,
        rescale: float = 0.0,
    ):
        self.model_fn = model_fn
        self.scale = float(scale)
        self.rescale = float(rescale)
        self.cond = self._rows(cond, batch_size, "cond")
        self.guided = self.scale != 1.0
        if self.guided:
            if uncond is None:
                raise ValueError(f"guidance_scale {self.scale} != 1 needs an uncond dict")
            uncond = self._rows(uncond, batch_size, "uncond")
            if set(uncond) != set(self.cond):
                raise ValueError(
                    f"cond and uncond must have the same keys, got {sorted(self.cond)} and "
                    f"{sorted(uncond)}"
                )
            self.joint = {k: torch.cat([self.cond[k], uncond[k]]) for k in self.cond}

    @staticmethod
    def _rows(
        cond: Mapping[str, torch.Tensor], batch_size: int, name: str
    ) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in cond.items():
            if value.shape[0] == batch_size:
                out[key] = value
            elif value.shape[0] == 1:  # one prompt for the whole batch
                out[key] = value.expand(batch_size, *value.shape[1:])
            else:
                raise ValueError(
                    f"{name}[{key!r}] has {value.shape[0]} rows for a batch of {batch_size}"
                )
        return out

    def __call__(self, x: torch.Tensor, timestep: float) -> torch.Tensor:
        t = torch.full((x.shape[0],), float(timestep), dtype=torch.float32, device=x.device)
        if not self.guided:
            return self.model_fn(x, t, self.cond).float()
        out = self.model_fn(torch.cat([x, x]), torch.cat([t, t]), self.joint).float()
        cond, uncond = out.chunk(2)
        return classifier_free_guidance(cond, uncond, self.scale, self.rescale)


class Sampler:
    """Common call: noise (or its shape) + conditioning -> x0 samples."""

    def __init__(
        self,
        kind: str,
        steps: int = 30,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
    ):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.kind = kind
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale

    @torch.no_grad()
    def __call__(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor | Sequence[int],
        cond: Mapping[str, torch.Tensor] | None = None,
        uncond: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float | None = None,
        steps: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """x0 samples. ``noise`` is the initial x_T (a tensor) or its shape, drawn N(0, I) from
        ``generator`` on the generator's device, then moved to ``device`` (default: the
        device of the conditioning tensors, if any)."""
        if isinstance(noise, torch.Tensor):
            x = noise.float()
        else:
            x = _gaussian(noise, generator)
        if device is None and cond:
            device = next(iter(cond.values())).device
        if device is not None:
            x = x.to(device)
        predict = GuidedModel(
            model_fn,
            cond or {},
            uncond,
            x.shape[0],
            self.guidance_scale if guidance_scale is None else guidance_scale,
            self.guidance_rescale if guidance_rescale is None else guidance_rescale,
        )
        steps = self.steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return self.sample(predict, x, steps, generator)

    def sample(
        self, predict: GuidedModel, x: torch.Tensor, steps: int, gen: torch.Generator | None
    ) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return _gaussian(x.shape, generator).to(x.device)


# --------------------------------------------------------------------------- discrete


class DiscreteSampler(Sampler):
    """A sampler on a discrete noise schedule: its timestep spacing and ancestral noise eta."""

    def __init__(
        self,
        schedule: DiscreteSchedule,
        kind: str,
        steps: int = 30,
        eta: float = 0.0,
        spacing: str = "trailing",
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
    ):
        super().__init__(kind, steps, guidance_scale, guidance_rescale)
        self.schedule = schedule
        self.eta = eta
        self.spacing = spacing


class DDIMSampler(DiscreteSampler):
    """DDIM with eta on a discrete schedule (Song et al. 2021)."""

    def sample(self, predict, x, steps, gen):
        timesteps = self.schedule.inference_timesteps(steps, self.spacing)
        for i, t in enumerate(timesteps):
            a, b = (float(c) for c in self.schedule.alpha_sigma(t))
            x0, eps = x0_eps_from_prediction(predict(x, t), x, a, b, self.kind)
            if i == len(timesteps) - 1:
                return x0  # the step to alpha_bar = 1 (no noise) lands on x0_hat
            a_next, b_next = (float(c) for c in self.schedule.alpha_sigma(timesteps[i + 1]))
            if self.eta > 0:
                # eq. 16; with a = 0 (zero terminal SNR) the second factor is 1.
                s = self.eta * (b_next / b) * math.sqrt(max(1 - a**2 / a_next**2, 0.0))
                s = min(s, b_next)
                x = a_next * x0 + math.sqrt(b_next**2 - s**2) * eps + s * self._noise_like(x, gen)
            else:
                x = a_next * x0 + b_next * eps
        raise AssertionError("unreachable")


class EulerSampler(DiscreteSampler):
    """Euler (ancestral for eta > 0) in the VE variables of a discrete schedule; with
    ``karras_sigmas`` on the noise levels of Karras et al. 2022 (eq. 5)."""

    def __init__(self, schedule: DiscreteSchedule, kind: str, steps: int = 30,
                 karras_sigmas: bool = False, **kwargs):
        super().__init__(schedule, kind, steps, **kwargs)
        self.karras_sigmas = karras_sigmas

    def grid(self, steps: int) -> tuple[list[float], list[float]]:
        """(sigmas, model timesteps): ``steps`` + 1 sigmas ending in 0, ``steps`` timesteps."""
        sched = self.schedule
        T = sched.num_train_timesteps
        if not self.karras_sigmas:
            ts = sched.inference_timesteps(steps, self.spacing)
            sigmas = sched.sigma(torch.tensor(ts, dtype=torch.float64)).tolist()
            return sigmas + [0.0], [float(t) for t in ts]
        # Karras et al. 2022 eq. 5 between the finite extremes of the schedule; at zero
        # terminal SNR the first point is sigma = inf (t = T-1), where the data is pure noise.
        start: list[float] = []
        start_t: list[float] = []
        top = T - 1
        n = steps
        if sched.zero_terminal_snr:
            start, start_t, top, n = [math.inf], [float(T - 1)], T - 2, steps - 1
        sigma_max, sigma_min = float(sched.sigma(top)), float(sched.sigma(0))
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        hi, lo = sigma_max ** (1 / KARRAS_RHO), sigma_min ** (1 / KARRAS_RHO)
        karras = (hi + ramp * (lo - hi)) ** KARRAS_RHO
        ts = sched.timestep_of_sigma(karras).tolist() if n > 0 else []
        return start + karras.tolist() + [0.0], start_t + ts

    def denoise(
        self, predict: GuidedModel, x: torch.Tensor, sigma: float, t: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) at the VP state x with VE noise level sigma (inf: a = 0)."""
        if math.isinf(sigma):
            a, b = 0.0, 1.0
        else:
            a = 1 / math.sqrt(1 + sigma**2)
            b = sigma * a
        return x0_eps_from_prediction(predict(x, t), x, a, b, self.kind)

    def sample(self, predict, x, steps, gen):
        sigmas, timesteps = self.grid(steps)
        for i, t in enumerate(timesteps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x0, eps = self.denoise(predict, x, sigma, t)
            if sigma_next == 0:
                return x0  # the last step lands on x0_hat
            x = self.step(predict, x, x0, eps, sigma, sigma_next, gen)
            x = x / math.sqrt(1 + sigma_next**2)  # back from VE to VP variables
        raise AssertionError("unreachable")

    def step(self, predict, x, x0, eps, sigma, sigma_next, gen) -> torch.Tensor:
        """The VE state at sigma_next, from x0_hat and eps_hat at sigma."""
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
        # VE Euler step: x/a + (sigma_down - sigma) eps_hat = x0_hat + sigma_down eps_hat.
        x_ve = x0 + sigma_down * eps
        if sigma_up > 0:
            x_ve = x_ve + sigma_up * self._noise_like(x, gen)
        return x_ve


class DPM2Sampler(EulerSampler):
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1 with r = 1/2; k-diffusion ``sample_dpm_2``), the
    second-order sampler for discrete schedules: the VE Euler step uses the slope eps_hat at the
    midpoint in log sigma, sigma_mid = sqrt(sigma sigma_next) (a fractional timestep).

    Why the log-sigma midpoint rather than Heun's trapezoid in sigma: the slope is ~eps
    (1 - s^2/sigma^2) for data of scale s, nearly constant at sigma >> s and changing only near
    the small end of a long step (the first steps of a cosine schedule span 2e4 -> 20); a
    trapezoid in sigma smears that change over the whole step, the log midpoint does not.
    A step from sigma = inf and the last step (to sigma = 0) are Euler steps."""

    def __init__(self, schedule: DiscreteSchedule, kind: str, steps: int = 30, **kwargs):
        if kwargs.pop("eta", 0.0) != 0.0:
            raise ValueError("dpm2 is deterministic; eta must be 0")
        super().__init__(schedule, kind, steps, **kwargs)

    def step(self, predict, x, x0, eps, sigma, sigma_next, gen) -> torch.Tensor:
        if math.isinf(sigma):
            return x0 + sigma_next * eps
        sigma_mid = math.sqrt(sigma * sigma_next)
        t_mid = float(self.schedule.timestep_of_sigma(torch.tensor(sigma_mid)))
        x_mid = (x0 + sigma_mid * eps) / math.sqrt(1 + sigma_mid**2)
        _, eps_mid = self.denoise(predict, x_mid, sigma_mid, t_mid)
        # x/a + (sigma_next - sigma) eps_mid, with x/a = x0_hat + sigma eps_hat.
        return x0 + sigma * eps + (sigma_next - sigma) * eps_mid


# --------------------------------------------------------------------------- flow


class FlowSampler(Sampler):
    """ODE samplers for rectified flow, t from 1 (noise) to 0 (data)."""

    order = 1

    def __init__(
        self,
        kind: str = "flow",
        steps: int = 30,
        shift: float = 1.0,
        shift_auto_base: int = 0,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
    ):
        super().__init__(kind, steps, guidance_scale, guidance_rescale)
        self.shift = shift
        self.shift_auto_base = shift_auto_base

    def grid(self, steps: int, shape: torch.Size) -> list[float]:
        """steps + 1 times from 1 to 0: uniform, then the resolution shift (SD3 sec. 5.3.2)."""
        s = resolution_shift(shape[-2], shape[-1], self.shift, self.shift_auto_base)
        return shift_timesteps(torch.linspace(1, 0, steps + 1, dtype=torch.float64), s).tolist()

    def velocity(self, predict: GuidedModel, x: torch.Tensor, t: float) -> torch.Tensor:
        pred = predict(x, t * FLOW_TIMESTEP_SCALE)
        return convert_prediction(pred, x, 1 - t, t, self.kind, "flow")

    def sample(self, predict, x, steps, gen):
        times = self.grid(steps, x.shape)
        for t, t_next in zip(times[:-1], times[1:]):
            x = self.step(predict, x, t, t_next)
        return x

    def step(self, predict, x, t, t_next):
        return x + (t_next - t) * self.velocity(predict, x, t)


class FlowEulerSampler(FlowSampler):
    """Euler: x_next = x + (t_next - t) v(x, t)."""


class FlowHeunSampler(FlowSampler):
    """Heun (Karras et al. 2022, Alg. 1 lines 9-11): average the slopes at both ends."""

    order = 2

    def step(self, predict, x, t, t_next):
        d = self.velocity(predict, x, t)
        x_euler = x + (t_next - t) * d
        if t_next == 0:
            return x_euler
        d_next = self.velocity(predict, x_euler, t_next)
        return x + (t_next - t) * 0.5 * (d + d_next)
