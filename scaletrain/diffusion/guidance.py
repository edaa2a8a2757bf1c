"""Classifier-free guidance (Ho & Salimans 2022) with optional guidance rescale.

CFG: pred = uncond + w (cond - uncond). Every conversion in parameterization.py is affine in
the prediction with coefficients that do not depend on it, so guiding eps, v, x0 or the flow
velocity gives the same guided x0; we guide the model's own output.

Guidance rescale (Lin et al. 2024, sec. 3.4, eq. 15-16): a large w inflates the prediction's
standard deviation (over-exposed images). Rescale the guided prediction to the conditional
prediction's per-sample std and blend with the plain guided one by phi:
    x_rescaled = x_cfg * std(x_pos) / std(x_cfg);  x_final = phi x_rescaled + (1 - phi) x_cfg.
As in the paper's algorithm, the std is taken per sample over all non-batch dimensions and the
rescale is applied to the model output.
"""

from __future__ import annotations

import torch


def _per_sample_std(x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, x.ndim))
    return x.std(dim=dims, keepdim=True)


def classifier_free_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0
) -> torch.Tensor:
    """Guided prediction. ``scale`` 1 returns ``cond`` itself (bit for bit)."""
    if scale == 1.0:
        return cond
    guided = uncond + scale * (cond - uncond)
    if rescale > 0.0:
        factor = _per_sample_std(cond) / _per_sample_std(guided).clamp_min(1e-12)
        guided = guided * (rescale * factor + (1.0 - rescale))
    return guided
