"""When to collect the models' stability diagnostics, and how to name them for logging.

The models compute the diagnostics themselves (seed 001: U-Net skip-vs-decoder activation
and gradient ratios per level; transformer residual update norm per block and the largest
attention logit) behind ``model.set_diagnostics(enabled)`` / ``model.pop_diagnostics()``.
Collection costs extra reductions in the forward and backward pass, so it runs only on
scheduled steps. This module is the thin glue between the loop and that model API.

Loop usage::

    collect = schedule.should_collect(step)
    set_model_diagnostics(engine.module, collect)
    ... forward, backward ...
    if collect:
        logger.log(step, diagnostics_metrics(pop_model_diagnostics(engine.module)))
"""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "diag/"


class DiagnosticsSchedule:
    """Collect diagnostics on steps that are multiples of ``every`` (0: never)."""

    def __init__(self, every: int) -> None:
        if every < 0:
            raise ValueError(f"diagnostics every must be >= 0 (0 disables), got {every}")
        self.every = every

    def should_collect(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


def _unwrap(model):
    # A DeepSpeed engine (or DDP) keeps the user's module in `.module`.
    while not hasattr(model, "set_diagnostics") and hasattr(model, "module"):
        model = model.module
    return model


def set_model_diagnostics(model, enabled: bool) -> bool:
    """Switch diagnostics on the model (or a wrapper of it); False if it has none."""
    model = _unwrap(model)
    if not hasattr(model, "set_diagnostics"):
        return False
    model.set_diagnostics(enabled)
    return True


def pop_model_diagnostics(model) -> dict[str, float]:
    """The model's diagnostics since they were enabled ({} if the model has none)."""
    model = _unwrap(model)
    if not hasattr(model, "pop_diagnostics"):
        return {}
    return dict(model.pop_diagnostics())


def diagnostics_metrics(diagnostics: Mapping[str, float]) -> dict[str, float]:
    """Prefix names with ``diag/`` (one wandb panel section) and make values plain floats."""
    return {
        PREFIX + name: float(value.item() if hasattr(value, "item") else value)
        for name, value in diagnostics.items()
    }
