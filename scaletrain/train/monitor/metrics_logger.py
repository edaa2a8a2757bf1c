"""Rank-0 metrics sink: one JSON line per logged dict in run_dir/metrics.jsonl, and wandb.

Every other rank gets a logger whose methods do nothing, so the loop can call ``log`` on all
ranks without ``if rank == 0`` around each call. Anything that needs all ranks (reducing a
metric across ranks) must happen *before* ``log``.

Resuming: the wandb run id is kept in ``run_dir/wandb_id.txt``, so a restarted job continues
the same wandb run (``resume="allow"``) instead of starting a new curve. The JSONL file is
appended to; pass ``resume_step`` to first drop lines for steps after the checkpoint that
the run resumes from (those steps are about to be trained and logged again).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import secrets
import string
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import wandb

from scaletrain.core.files import atomic_write
from scaletrain.core.log import show_dependency_output
from scaletrain.train.monitor.config import LoggingConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"

# Names wandb has accepted for WANDB_MODE over its versions, mapped onto ours.
_MODE_ALIASES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


def resolve_wandb_mode(cfg: LoggingConfig, environ: Mapping[str, str] | None = None) -> str:
    """The wandb mode to use: WANDB_MODE if set (operators' switch), else ``cfg.wandb_mode``."""
    environ = os.environ if environ is None else environ
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if not env_mode:
        return cfg.wandb_mode
    if env_mode not in _MODE_ALIASES:
        raise ValueError(
            f"environment variable WANDB_MODE={env_mode!r}: expected one of "
            + ", ".join(sorted(_MODE_ALIASES))
        )
    return _MODE_ALIASES[env_mode]


def persistent_wandb_id(run_dir: Path) -> str:
    """The wandb run id of this run directory, created (and written atomically) on first use."""
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        run_id = path.read_text(encoding="utf-8").strip()
        if not run_id:
            raise ValueError(f"{path}: empty wandb run id; delete the file to start a new run")
        return run_id
    # wandb's own id format: 8 characters of [a-z0-9].
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    atomic_write(path, run_id + "\n")
    return run_id


def to_json_scalar(value: Any) -> Any:
    """A plain Python scalar for JSON: tensors and numpy scalars become floats/ints.

    Non-finite floats become None: a NaN is not valid JSON, and skipped steps are counted by
    their own metric.
    """
    if hasattr(value, "item") and callable(value.item):  # torch tensor / numpy scalar
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(f"metric value {value!r} of type {type(value).__name__} is not a scalar")


def truncate_jsonl_after(path: Path, step: int) -> int:
    """Drop the lines of ``path`` whose step is greater than ``step``; return how many went."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            line_step = json.loads(line).get("step")
        except json.JSONDecodeError:
            # A line cut short by a kill mid-write: it carries nothing recoverable.
            dropped += 1
            continue
        if isinstance(line_step, int) and line_step > step:
            dropped += 1
        else:
            kept.append(line)
    atomic_write(path, "".join(f"{line}\n" for line in kept))
    return dropped


class MetricsLogger:
    """Writes metrics on rank 0 to run_dir/metrics.jsonl and wandb; a no-op on other ranks.

    Args:
        cfg: the ``logging`` config section.
        run_dir: the run directory (created if missing).
        rank: this process's global rank.
        config_dict: the resolved root config as plain data, stored as the wandb run config.
        resume_step: when resuming from a checkpoint at this step, JSONL lines of later steps
            (logged by the interrupted job after its last checkpoint) are dropped first.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: str | Path,
        rank: int,
        config_dict: dict | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self._jsonl = None
        self._wandb_run = None
        self._closed = False
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            path = self.run_dir / METRICS_FILE
            if resume_step is not None:
                dropped = truncate_jsonl_after(path, resume_step)
                if dropped:
                    logger.info("dropped %d metric lines after step %d", dropped, resume_step)
            # Line-buffered: each log line reaches the file at once, so a killed run loses
            # at most the line being written.
            self._jsonl = open(path, "a", encoding="utf-8", buffering=1)
        mode = resolve_wandb_mode(cfg)
        if mode != "disabled":
            self._wandb_run = self._init_wandb(mode, config_dict or {})

    @property
    def wandb_run(self):
        """The live wandb run on rank 0 (None elsewhere, or when wandb is disabled)."""
        return self._wandb_run

    def _init_wandb(self, mode: str, config_dict: dict):
        # A training run owns its wandb service. WANDB_SERVICE inherited from a parent (a
        # launcher, a notebook, a test runner that used wandb) points at the parent's service:
        # a SIGKILLed predecessor's run stays registered there, and the resumed run's
        # init with the same id then fails with "run ID ... is in use".
        os.environ.pop("WANDB_SERVICE", None)

        kwargs = dict(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity,
            name=self.cfg.run_name or self.run_dir.resolve().name,
            dir=str(self.run_dir),
            config=config_dict,
            tags=list(self.cfg.wandb_tags) or None,
            id=persistent_wandb_id(self.run_dir),
            resume="allow",
            # Quiet: no history and summary tables at the end (about ten lines); where the
            # run is kept (or its URL) is still said. The console's summary is ours.
            settings=wandb.Settings(quiet=not show_dependency_output()),
        )
        try:
            return wandb.init(mode=mode, **kwargs)
        except Exception as exc:
            if mode != "online":
                raise
            # A wandb outage or missing login must not cost a cluster job: keep the metrics
            # locally; `wandb sync run_dir/wandb/offline-run-*` uploads them later.
            logger.warning("wandb online init failed (%s); logging offline instead", exc)
            return wandb.init(mode="offline", **kwargs)

    def log(self, step: int, metrics: Mapping[str, Any], samples_seen: int | None = None) -> None:
        """Log scalar ``metrics`` at optimizer step ``step`` (rank 0; no-op elsewhere)."""
        if not self.enabled or self._closed:
            return
        row = {k: to_json_scalar(v) for k, v in metrics.items()}
        if samples_seen is not None:
            row["samples_seen"] = int(samples_seen)
        self._write_jsonl(step, row)
        if self._wandb_run is not None:
            self._wandb_run.log(row, step=step)

    def log_image(self, step: int, key: str, path: str | Path, caption: str | None = None) -> None:
        """Log the image file at ``path`` under ``key`` (rank 0; no-op elsewhere)."""
        if not self.enabled or self._closed:
            return
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"log_image: {path} does not exist")
        try:
            shown = str(path.resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            shown = str(path)
        self._write_jsonl(step, {key: shown, **({f"{key}_caption": caption} if caption else {})})
        if self._wandb_run is not None:
            self._wandb_run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def _write_jsonl(self, step: int, row: dict[str, Any]) -> None:
        if self._jsonl is None:
            return
        record = {"step": int(step), "time": time.time(), **row}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")

    def close(self, exit_code: int = 0) -> None:
        """Flush and close the JSONL file and finish the wandb run (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
