"""Small helpers shared by the encoders: dtypes and devices."""

from __future__ import annotations

import importlib
import logging
import os
import re
from pathlib import Path

import torch

from scaletrain.core.config_base import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}") from None


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> this process's GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0") or 0)
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(device)


HUB_LIBRARIES = ("huggingface_hub", "transformers", "diffusers")


def quiet_hub_libraries(libraries: tuple[str, ...] = HUB_LIBRARIES) -> None:
    """transformers/diffusers print load reports and progress bars per model ("Loading
    weights" at every validation); a run wants its own progress line only. The hub client's
    retry warnings say nothing a failed load does not say in one line. ``libraries`` names
    the ones to quiet (each is imported: give only those the caller is about to use; the
    environment set by :func:`scaletrain.core.log.quiet_dependency_output` covers the rest)."""
    if "huggingface_hub" in libraries:
        try:
            import huggingface_hub  # heavy: imported when used

            huggingface_hub.utils.logging.set_verbosity_error()
        except (ImportError, AttributeError):
            pass
        for name in list(logging.root.manager.loggerDict):  # some set their own level
            if name.startswith("huggingface_hub"):
                logging.getLogger(name).setLevel(logging.ERROR)
    for library in ("transformers", "diffusers"):
        if library not in libraries:
            continue
        try:  # heavy (see encoders/__init__.py): imported when used
            module = importlib.import_module(f"{library}.utils.logging")
            module.set_verbosity_error()
            module.disable_progress_bar()
        except (ImportError, AttributeError):
            pass


def load_failure(what: str, name: str, subfolder: str | None, exc: Exception) -> Exception:
    """The one-line error for a model that would not load. A name of the form org/name that
    is no local path was taken as a hub id: offline (or misspelt) the libraries answer with
    a page about a missing config.json, so say what to do instead; the original error stays
    chained for the log."""
    where = name + (f" (subfolder {subfolder})" if subfolder else "")
    if not Path(name).expanduser().exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
            return ConfigError(
                f"{what}: model {name!r} is not available offline (no network, and not in "
                "the Hugging Face cache); give a local path (download it where there is "
                f"network: huggingface-cli download {name})")
        return ConfigError(f"{what}: {name}: no such file or directory")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OSError(f"cannot load the {what} from {where}: {first}")
