"""The seam between the loop and scaletrain.train.monitor (metrics, wandb, throughput).

The monitor package is built beside the engine; until it is present this falls back to a
JSON-lines writer on rank 0 (``run_dir/metrics.jsonl``), so the loop never depends on
which of the two is installed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class JsonlMetrics:
    """Rank 0 appends one JSON object per logged step; other ranks do nothing."""

    def __init__(self, run_dir: str | Path, rank: int) -> None:
        self.path = Path(run_dir) / METRICS_FILE if rank == 0 else None

    def log(self, step: int, metrics: dict[str, Any], samples_seen: int | None = None) -> None:
        if self.path is None:
            return
        row = {"step": step, **({"samples_seen": samples_seen} if samples_seen is not None
                                else {}), **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def close(self, exit_code: int = 0) -> None:
        pass


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def open_metrics_logger(cfg, run_dir: str | Path, rank: int, config_dict: dict):
    """monitor.MetricsLogger (wandb + JSONL) when available, else the JSONL fallback."""
    try:
        from scaletrain.train.monitor.metrics_logger import MetricsLogger
    except ImportError:
        return JsonlMetrics(run_dir, rank)
    return MetricsLogger(cfg.logging, run_dir, rank, config_dict)
