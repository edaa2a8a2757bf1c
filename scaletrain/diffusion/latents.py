"""The clean latents x0 of a training batch, drawn on the batch's device.

The loader hands over the VAE posterior's stored mean and std (``latents_mean``,
``latents_std``, in their stored dtype) with the dataset's ``latent_scaling_factor`` and
``latent_shift_factor``; here ``x0 = (mean + std * eps - shift) * scale`` with ``eps`` from the
step's generator (Rombach et al. 2022, sec. 3: a fresh posterior sample each time a sample is
seen). The draw costs the GPU one fused elementwise op instead of a CPU loader half its time,
and resume stays exact because the step's generator is seeded by (seed, rank, samples seen,
micro-batch). A batch that already has ``latents`` (synthetic data, held-out evaluation,
``data.sample_latents: false``) is used as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def draw_latents(batch: Mapping[str, Any], generator: torch.Generator) -> torch.Tensor:
    """x0 of ``batch`` as float32 on the batch's device (see the module docstring)."""
    if "latents" in batch:
        return batch["latents"].float()
    if "latents_mean" not in batch or "latents_std" not in batch:
        raise KeyError(f"batch has neither 'latents' nor 'latents_mean'/'latents_std'; "
                       f"keys: {sorted(batch)}")
    mean, std = batch["latents_mean"], batch["latents_std"]
    eps = torch.randn(mean.shape, generator=generator, device=generator.device,
                      dtype=torch.float32).to(mean.device)
    z = torch.addcmul(mean.float(), std.float(), eps)
    shift = float(batch.get("latent_shift_factor", 0.0))
    if shift:
        z = z - shift
    return z * float(batch.get("latent_scaling_factor", 1.0))
