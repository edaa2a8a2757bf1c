"""Logging, set up in one place and rank-aware.

Only rank 0 logs INFO by default; other ranks log WARNING and above unless ``all_ranks``
(or SCALETRAIN_LOG_ALL_RANKS=1). The rank comes from the launcher's environment.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

_FORMAT = "%(asctime)s [%(levelname)s] [rank %(rank)s] %(name)s: %(message)s"


def env_rank() -> int:
    """This process's global rank from torchrun/DeepSpeed (RANK) or SLURM (SLURM_PROCID)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def show_dependency_output() -> bool:
    """SCALETRAIN_SHOW_WARNINGS=1: the dependencies' warnings, bars and chatter are shown."""
    return os.environ.get("SCALETRAIN_SHOW_WARNINGS") == "1"


def quiet_dependency_warnings() -> None:
    """Hide deprecation notices raised inside dependencies (a user cannot act on them);
    scaletrain's own stay visible. SCALETRAIN_SHOW_WARNINGS=1 shows everything."""
    if show_dependency_output():
        return
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=r"scaletrain(\.|$)")
    # The hub client's notices about arguments its callers (diffusers) still pass.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"huggingface_hub(\.|$)")


# Set (unless the user set them) before the hub libraries are imported, and inherited by
# every rank and worker process: no per-model "Loading weights" or download bars from
# huggingface_hub/transformers, and no retry warnings from the hub client (a failed load is
# said in one line of ours: scaletrain.data.encoders.common.load_failure).
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_VERBOSITY": "error"}


def quiet_dependency_output() -> None:
    """Quiet by default: the dependencies' progress bars and chatter never reach the console
    (scaletrain's own progress line does). SCALETRAIN_SHOW_WARNINGS=1 shows everything."""
    if show_dependency_output():
        return
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def captured_output(what: str) -> Iterator[None]:
    """Run a dependency's step that prints and draws progress bars (DeepSpeed's checkpoint
    conversions) with its stdout and stderr kept off the console; what it wrote is logged at
    DEBUG (``--log-level DEBUG`` shows it). Our own log lines are unaffected: their handlers
    hold the real streams."""
    if show_dependency_output():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            logging.getLogger(__name__).debug("%s wrote:\n%s", what, text)


class _DropMessages(logging.Filter):
    """Drops a dependency's records that start with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# DeepSpeed warnings no user can act on, said by every rank: we never pass an MPU (no
# tensor or pipeline parallelism), so a universal-checkpoint resume always "sets tp size 1".
_UNACTIONABLE = {"DeepSpeed": ("MPU is not provided",)}


def setup_logging(level: str = "INFO", rank: int | None = None, all_ranks: bool = False) -> None:
    """Configure the root logger once for this process."""
    rank = env_rank() if rank is None else rank
    all_ranks = all_ranks or os.environ.get("SCALETRAIN_LOG_ALL_RANKS") == "1"
    effective = level if (rank == 0 or all_ranks) else "WARNING"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(effective)
    quiet_dependency_warnings()
    # Third-party libraries are noisy at INFO; keep them at WARNING.
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "urllib3", "PIL", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for name, prefixes in _UNACTIONABLE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


FILE_ONLY = "scaletrain.file_only"  # a logger whose records go to the log file, not the console


def add_log_file(path, rank: int | None = None) -> logging.Handler:
    """Also append everything logged (at the root logger's level) to ``path``, so that the
    console of a run is kept with it; records of the ``FILE_ONLY`` logger go only there."""
    from pathlib import Path

    rank = env_rank() if rank is None else rank
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    root = logging.getLogger()
    for other in root.handlers:  # the console never shows the file-only records
        other.addFilter(lambda record: not record.name.startswith(FILE_ONLY))
    root.addHandler(handler)
    return handler
