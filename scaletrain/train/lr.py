"""Learning-rate schedule: linear warm-up, then constant or cosine decay (per optimizer step).

The loop sets the LR itself before every step instead of handing DeepSpeed a scheduler, so
the LR is a pure function of the step count and resuming needs no scheduler state.
"""

from __future__ import annotations

import math

from scaletrain.train.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int) -> float:
    """LR for the optimizer step with 0-based index ``step``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    # Cosine (Loshchilov & Hutter 2017, SGDR without restarts) from lr to min_lr over the
    # steps after warm-up.
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
