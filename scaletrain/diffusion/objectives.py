"""Training objectives: one call turns a batch into per-sample losses.

    loss, logs = objective(model_fn, batch, generator)

draws, in this order and all from ``generator`` (seeded per step by the trainer, so every
epoch differs yet a seed replays it): the posterior sample x0 when the batch carries the
latents' mean and std (:mod:`scaletrain.diffusion.latents`), the CFG dropout masks, the
timesteps, the noise. It forms
x_t = a x0 + b eps, calls ``model_fn(x_t, model_timestep, cond)`` and returns the weighted MSE
per sample (shape [B], float32) so the trainer can bucket the loss by timestep.

Timesteps passed to the model: discrete schedules the integer index 0..T-1 (as float), rectified
flow t * 1000 (the SD3 / diffusers convention). ``logs["timesteps"]`` is always in [0, 1]
(index / (T-1), or t) with 1 the noisiest.

``logs`` (each a [B] tensor on the loss's device): ``timesteps``, ``model_timesteps``,
``loss_unweighted`` (the plain MSE), ``loss_weight``, and ``cfg_dropped_text`` /
``cfg_dropped_pooled`` / ``cfg_dropped_time_ids`` (bool).

Evaluation draws nothing: ``points_at(t)`` places samples at given process times and
``loss_at(model_fn, x0, cond, points, eps)`` is the same noising, model call and MSE with
the caller's noise (the held-out validation loss of :mod:`scaletrain.eval`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from scaletrain.diffusion.conditioning import (
    CFGDropout,
    ModelFn,
    cond_from_batch,
    drop_conditioning,
)
from scaletrain.diffusion.config import DiffusionConfig
from scaletrain.diffusion.latents import draw_latents
from scaletrain.diffusion.parameterization import target_from_x0_eps
from scaletrain.diffusion.schedules import DiscreteSchedule
from scaletrain.diffusion.timesteps import (
    FLOW_TIMESTEP_SCALE,
    resolution_shift,
    sample_unit_timesteps,
    shift_timesteps,
)
from scaletrain.diffusion.weighting import loss_weights


@dataclass
class TimePoints:
    """Where on the noise process each sample of a batch sits (all [B], float64, CPU)."""

    a: torch.Tensor  # signal coefficient of x_t = a x0 + b eps
    b: torch.Tensor  # noise coefficient
    unit: torch.Tensor  # normalised timestep in [0, 1], 1 = noisiest (logged as "timesteps")
    model: torch.Tensor  # the timestep the model is given


class Objective:
    """Base: CFG dropout, noising, target, weighting. Subclasses place samples in time."""

    kind: str  # the prediction kind (parameterization.PREDICTION_KINDS)

    def __init__(self, cfg: DiffusionConfig, null_cond: Mapping[str, torch.Tensor] | None = None):
        self.cfg = cfg
        self.kind = cfg.objective
        self.null_cond = dict(null_cond) if null_cond is not None else None
        self.dropout = CFGDropout(
            prompt=cfg.cfg_drop_prompt,
            text=cfg.cfg_drop_text,
            pooled=cfg.cfg_drop_pooled,
            time_ids=cfg.cfg_drop_time_ids,
            mode=cfg.cfg_null,
        )

    # --------------------------------------------------------------- subclass interface
    def time_points(self, unit: torch.Tensor, latent_shape: torch.Size) -> TimePoints:
        """Map draws u in [0, 1] (float64, [B]) to the process's time points."""
        raise NotImplementedError

    # --------------------------------------------------------------- pieces, for callers/tests
    def sample_time_points(
        self, batch_size: int, latent_shape: torch.Size, generator: torch.Generator
    ) -> TimePoints:
        cfg = self.cfg
        unit = sample_unit_timesteps(
            cfg.timestep_sampling,
            batch_size,
            generator,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
        ).cpu()
        return self.time_points(unit, latent_shape)

    def noised(
        self, x0: torch.Tensor, eps: torch.Tensor, points: TimePoints
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target) for clean ``x0`` and noise ``eps`` at ``points``."""
        a = points.a.to(device=x0.device, dtype=x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        b = points.b.to(device=x0.device, dtype=x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = a * x0 + b * eps
        target = target_from_x0_eps(x0, eps, points.a, points.b, self.kind)
        return x_t, target

    def weights(self, points: TimePoints) -> torch.Tensor:
        cfg = self.cfg
        return loss_weights(
            cfg.loss_weighting,
            a=points.a,
            b=points.b,
            t=points.unit,
            kind=self.kind,
            min_snr_gamma=cfg.min_snr_gamma,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
        )

    def points_at(self, t: torch.Tensor) -> TimePoints:
        """The time points at process times ``t`` in [0, 1] (1 the noisiest; the convention of
        ``logs["timesteps"]``), with no timestep density and no shift applied: fixed
        evaluation timesteps mean the same noise level whatever the training density."""
        raise NotImplementedError

    def loss_at(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        points: TimePoints,
        eps: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(plain MSE, loss weight), each [B] float32, of ``model_fn`` on ``x0`` noised with
        the given ``eps`` at the given ``points``: the loss without any draw. Training draws
        the points and the noise and calls this; evaluation passes fixed ones."""
        x0 = x0.float()
        x_t, target = self.noised(x0, eps.to(device=x0.device, dtype=x0.dtype), points)
        model_t = points.model.to(device=x0.device, dtype=torch.float32)
        pred = model_fn(x_t, model_t, cond)
        if pred.shape != target.shape:
            raise ValueError(
                f"model output {tuple(pred.shape)} does not match latents {tuple(target.shape)}"
            )
        dims = tuple(range(1, x0.ndim))
        mse = (pred.float() - target).square().mean(dim=dims)
        weight = self.weights(points).to(device=mse.device, dtype=mse.dtype)
        return mse, weight

    # --------------------------------------------------------------- the call
    def __call__(
        self, model_fn: ModelFn, batch: Mapping[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        x0 = draw_latents(batch, generator)
        if x0.ndim < 2:
            raise ValueError(f"batch['latents'] must be (B, ...), got {tuple(x0.shape)}")
        batch_size = x0.shape[0]

        null_cond = batch.get("null_cond", self.null_cond)
        cond = cond_from_batch(batch)
        for key, value in cond.items():
            if value.shape[0] != batch_size:
                raise ValueError(
                    f"batch[{key!r}] has {value.shape[0]} rows, latents have {batch_size}"
                )
        dropped = self.dropout.draw(batch_size, generator)
        cond = drop_conditioning(cond, **dropped, mode=self.dropout.mode, null_cond=null_cond)

        points = self.sample_time_points(batch_size, x0.shape, generator)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        mse, weight = self.loss_at(model_fn, x0, cond, points, eps)
        loss = weight * mse
        # Every log is a [B] tensor on the loss's device, so the trainer can bucket the loss
        # by timestep without a device transfer.
        logs = {
            "timesteps": points.unit.to(device=mse.device, dtype=torch.float32),
            "model_timesteps": points.model.to(device=mse.device, dtype=torch.float32),
            "loss_unweighted": mse.detach(),
            "loss_weight": weight.detach(),
            "cfg_dropped_text": dropped["text"].to(mse.device),
            "cfg_dropped_pooled": dropped["pooled"].to(mse.device),
            "cfg_dropped_time_ids": dropped["time_ids"].to(mse.device),
        }
        return loss, logs


class DiscreteObjective(Objective):
    """eps / v / x0 prediction on a discrete VP schedule (Ho et al. 2020; Salimans & Ho 2022)."""

    def __init__(
        self,
        cfg: DiffusionConfig,
        schedule: DiscreteSchedule | None = None,
        null_cond: Mapping[str, torch.Tensor] | None = None,
    ):
        super().__init__(cfg, null_cond)
        self.schedule = schedule or DiscreteSchedule.from_config(cfg)

    def time_points(self, unit: torch.Tensor, latent_shape: torch.Size) -> TimePoints:
        T = self.schedule.num_train_timesteps
        # u ~ U[0,1) gives each index probability 1/T; other densities map the same way.
        index = (unit * T).floor().clamp(0, T - 1)
        a, b = self.schedule.alpha_sigma(index)
        return TimePoints(a=a, b=b, unit=index / (T - 1), model=index)

    def points_at(self, t: torch.Tensor) -> TimePoints:
        T = self.schedule.num_train_timesteps
        index = (torch.as_tensor(t, dtype=torch.float64).cpu() * (T - 1)).round()
        a, b = self.schedule.alpha_sigma(index)
        return TimePoints(a=a, b=b, unit=index / (T - 1), model=index)


class FlowObjective(Objective):
    """Rectified flow (Esser et al. 2024, SD3): x_t = (1 - t) x0 + t eps, target eps - x0."""

    def shift_for(self, latent_shape: torch.Size) -> float:
        height, width = latent_shape[-2], latent_shape[-1]
        return resolution_shift(height, width, self.cfg.shift, self.cfg.shift_auto_base)

    def time_points(self, unit: torch.Tensor, latent_shape: torch.Size) -> TimePoints:
        t = shift_timesteps(unit, self.shift_for(latent_shape))
        return TimePoints(a=1 - t, b=t, unit=t, model=t * FLOW_TIMESTEP_SCALE)

    def points_at(self, t: torch.Tensor) -> TimePoints:
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        return TimePoints(a=1 - t, b=t, unit=t, model=t * FLOW_TIMESTEP_SCALE)
