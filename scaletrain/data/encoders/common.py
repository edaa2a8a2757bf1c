"""Small helpers shared by the encoders: dtypes and devices."""

from __future__ import annotations

import os

import torch

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


def quiet_hub_libraries() -> None:
    """transformers/diffusers print load reports and progress bars per model; a
    preprocessing run loads a few models once and wants its own progress bar only."""
    try:
        import transformers  # heavy (see encoders/__init__.py): imported when used

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass
    try:
        import diffusers  # heavy (see encoders/__init__.py): imported when used

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass
