"""Diffusion objectives, noise schedules and samplers, separate from the backbones.

Training (the trainer supplies ``model_fn(x_t, timestep, cond) -> prediction``, e.g. from
:func:`make_model_fn`, and a generator seeded per step)::

    objective = build_objective(cfg.diffusion, null_cond=empty_prompt)   # null_cond optional
    per_sample_loss, logs = objective(model_fn, batch, generator)        # [B], logs["timesteps"]

Sampling::

    sampler = build_sampler(cfg.diffusion)                     # defaults from the config
    uncond = make_uncond(cond, cfg.diffusion.cfg_null, empty_prompt)
    x0 = sampler(model_fn, (B, C, H, W), cond, uncond, generator)   # or initial noise x_T
    x0 = sampler(model_fn, x_T, cond, uncond, generator, guidance_scale=7.0, steps=50)

The uncond dict must be built the way training dropped the prompt (``cfg_null``): zeros, or
the empty-prompt encoding; :func:`make_uncond` does exactly that.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from scaletrain.diffusion.conditioning import (
    CFGDropout,
    cond_from_batch,
    make_model_fn,
    make_uncond,
)
from scaletrain.diffusion.config import DiffusionConfig
from scaletrain.diffusion.guidance import classifier_free_guidance
from scaletrain.diffusion.objectives import DiscreteObjective, FlowObjective, Objective
from scaletrain.diffusion.samplers import (
    DDIMSampler,
    DPM2Sampler,
    EulerSampler,
    FlowEulerSampler,
    FlowHeunSampler,
    Sampler,
)
from scaletrain.diffusion.schedules import DiscreteSchedule

__all__ = [
    "CFGDropout",
    "DiffusionConfig",
    "DiscreteSchedule",
    "Objective",
    "Sampler",
    "build_objective",
    "build_sampler",
    "build_schedule",
    "classifier_free_guidance",
    "cond_from_batch",
    "make_model_fn",
    "make_uncond",
]


def build_schedule(cfg: DiffusionConfig) -> DiscreteSchedule | None:
    """The discrete noise schedule of ``cfg``, or None for rectified flow."""
    return None if cfg.is_flow else DiscreteSchedule.from_config(cfg)


def build_objective(
    cfg: DiffusionConfig, null_cond: Mapping[str, torch.Tensor] | None = None
) -> Objective:
    """The training objective. ``null_cond`` ({"encoder_hidden_states": (L, D), "pooled": (P,)})
    is the empty-prompt encoding that cfg_null 'empty_prompt' substitutes; a batch may instead
    carry it as batch["null_cond"]."""
    if cfg.is_flow:
        return FlowObjective(cfg, null_cond=null_cond)
    return DiscreteObjective(cfg, null_cond=null_cond)


def build_sampler(
    cfg: DiffusionConfig,
    name: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float | None = None,
    eta: float | None = None,
) -> Sampler:
    """A sampler for models trained with ``cfg``; each argument left None takes the config's
    default (sampler, sample_steps, guidance_scale, guidance_rescale, eta)."""
    name = name or cfg.resolved_sampler
    steps = cfg.sample_steps if steps is None else steps
    scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
    rescale = cfg.guidance_rescale if guidance_rescale is None else guidance_rescale
    eta = cfg.eta if eta is None else eta
    common = {"steps": steps, "guidance_scale": scale, "guidance_rescale": rescale}
    if cfg.is_flow:
        if eta != 0:
            raise ValueError("flow samplers are deterministic ODE solvers; eta must be 0")
        shift = {"shift": cfg.shift, "shift_auto_base": cfg.shift_auto_base}
        if name == "euler":
            return FlowEulerSampler(cfg.objective, **shift, **common)
        if name == "heun":
            return FlowHeunSampler(cfg.objective, **shift, **common)
        raise ValueError(f"sampler {name!r} is not available for flow; use euler or heun")
    schedule = DiscreteSchedule.from_config(cfg)
    if name == "ddim":
        return DDIMSampler(schedule, cfg.objective, eta=eta, spacing=cfg.timestep_spacing, **common)
    if name == "euler":
        return EulerSampler(
            schedule,
            cfg.objective,
            eta=eta,
            spacing=cfg.timestep_spacing,
            karras_sigmas=cfg.karras_sigmas,
            **common,
        )
    if name == "dpm2":
        if eta != 0:
            raise ValueError("dpm2 is deterministic; eta must be 0")
        return DPM2Sampler(
            schedule,
            cfg.objective,
            spacing=cfg.timestep_spacing,
            karras_sigmas=cfg.karras_sigmas,
            **common,
        )
    raise ValueError(
        f"sampler {name!r} is not available for objective {cfg.objective!r}; "
        f"use ddim, euler or dpm2"
    )
