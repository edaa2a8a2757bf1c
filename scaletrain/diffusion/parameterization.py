"""Prediction targets and the conversions between them.

Every process here is a Gaussian interpolant x_t = a x0 + b eps:
variance-preserving discrete schedules have a^2 + b^2 = 1 (a = sqrt(alpha_bar)); rectified
flow has a = 1 - t, b = t (Esser et al. 2024, eq. 3 with the RF choice). The model predicts one
of

* ``eps``: the noise (Ho et al. 2020);
* ``x0``: the clean sample;
* ``v``: a eps - b x0 (Salimans & Ho 2022, sec. 4; "velocity" of the VP angle);
* ``flow``: the rectified-flow velocity dx_t/dt = eps - x0 (Liu et al. 2022; SD3 eq. 3).

The formulas below are written for general (a, b), so they are exact for both processes.
"""

from __future__ import annotations

import torch

PREDICTION_KINDS = ("eps", "x0", "v", "flow")


def _expand(coef: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient [B] (or a scalar) shaped to broadcast against ``like``."""
    coef = torch.as_tensor(coef, dtype=like.dtype, device=like.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1)))


def target_from_x0_eps(
    x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor | float, b: torch.Tensor | float, kind: str
) -> torch.Tensor:
    """What a model of parameterisation ``kind`` should output at x_t = a x0 + b eps."""
    a, b = _expand(a, x0), _expand(b, x0)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - b * x0
    if kind == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTION_KINDS}")


def x0_eps_from_prediction(
    pred: torch.Tensor,
    x_t: torch.Tensor,
    a: torch.Tensor | float,
    b: torch.Tensor | float,
    kind: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a prediction of kind ``kind`` at x_t = a x0 + b eps.

    eps is undefined where a = 0 for ``eps`` (pure noise carries no x0) and x0 where b = 0 for
    ``x0``; callers avoid those points (the config forbids eps with zero terminal SNR)."""
    a, b = _expand(a, x_t), _expand(b, x_t)
    if kind == "eps":
        return (x_t - b * pred) / a, pred
    if kind == "x0":
        return pred, (x_t - a * pred) / b
    if kind == "v":
        # From x = a x0 + b eps, v = a eps - b x0: a x - b v = (a^2+b^2) x0, b x + a v =
        # (a^2+b^2) eps (Salimans & Ho 2022, appendix D, with a^2+b^2 kept general).
        norm = a * a + b * b
        return (a * x_t - b * pred) / norm, (b * x_t + a * pred) / norm
    if kind == "flow":
        # eps = x0 + u and x = a x0 + b eps = (a+b) x0 + b u.
        x0 = (x_t - b * pred) / (a + b)
        return x0, x0 + pred
    raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTION_KINDS}")


def convert_prediction(
    pred: torch.Tensor,
    x_t: torch.Tensor,
    a: torch.Tensor | float,
    b: torch.Tensor | float,
    from_kind: str,
    to_kind: str,
) -> torch.Tensor:
    """Re-express a prediction of one kind as another at the same point (a, b, x_t)."""
    if from_kind == to_kind:
        return pred
    x0, eps = x0_eps_from_prediction(pred, x_t, a, b, from_kind)
    return target_from_x0_eps(x0, eps, a, b, to_kind)
