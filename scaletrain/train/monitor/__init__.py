"""Training-time monitoring: metrics, wandb, throughput/MFU, diagnostics, validation.

A library the training loop calls; nothing here owns training state. Modules:

* ``config``: LoggingConfig, ValidationConfig (the ``logging`` and ``validation`` sections).
* ``metrics_logger``: MetricsLogger (rank 0 -> run_dir/metrics.jsonl + wandb).
* ``throughput``: Throughput (samples/s, TFLOP/s, MFU, data wait, step time, memory).
* ``timestep_loss``: LossByTimestep (loss per bucket of normalised timestep).
* ``diagnostics``: DiagnosticsSchedule and the glue to the models' diagnostics API.
* ``validation``: Validator (fixed prompts/seeds from the EMA weights -> PNG grid).
* ``image_grid``: save_image_grid.
* ``wandb_records``: read back offline ``.wandb`` files (tests, offline inspection).

The names below are importable from the package; they load lazily, because the root config
imports ``monitor.config`` and loading a config must not pay for importing torch and wandb.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoggingConfig": "config",
    "ValidationConfig": "config",
    "DiagnosticsSchedule": "diagnostics",
    "diagnostics_metrics": "diagnostics",
    "pop_model_diagnostics": "diagnostics",
    "set_model_diagnostics": "diagnostics",
    "save_image_grid": "image_grid",
    "MetricsLogger": "metrics_logger",
    "Throughput": "throughput",
    "peak_memory_bytes": "throughput",
    "LossByTimestep": "timestep_loss",
    "Validator": "validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
