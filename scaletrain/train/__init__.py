"""The training engine: DeepSpeed ZeRO + bf16, sharded EMA, exact checkpoint-resume.

Public API (loaded lazily: importing the config must not import torch):

* ``run_training(cfg: RootConfig, run_dir) -> TrainOutcome`` (status "completed" |
  "preempted", step, samples_seen): what every process of a job calls.
* ``EXIT_REQUEUE`` (75): the exit status that asks a launcher to requeue the job.
* ``consolidate_ema(checkpoint_dir)`` / ``consolidate_model(checkpoint_dir)``: full fp32
  ``{name: tensor}`` on CPU from a checkpoint of any world size and ZeRO stage.
* ``find_latest(run_dir)``: the newest complete checkpoint directory, or None.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_training": "loop",
    "TrainOutcome": "loop",
    "NonFiniteTrainingError": "loop",
    "EXIT_REQUEUE": "signals",
    "consolidate_ema": "checkpoint",
    "consolidate_model": "checkpoint",
    "find_latest": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
