"""What an export directory holds, written by :mod:`.writer` and read by :mod:`.reader`.

Two layouts, both self-describing (everything ``scaletrain sample`` needs is inside):

``safetensors`` (ours)::

    model.safetensors     the consolidated state dict, our parameter names, one dtype
    config.json           export metadata (below)

``diffusers``::

    diffusion_pytorch_model.safetensors   diffusers' parameter names (beta/LayerScale folded,
                                          SD3's stored pos_embed table added)
    config.json                           the diffusers class's config (``_class_name`` first):
                                          ``UNet2DConditionModel.from_pretrained(DIR)`` or
                                          ``SD3Transformer2DModel.from_pretrained(DIR)`` loads it
    scaletrain.json                       export metadata (below)

Export metadata (JSON)::

    format, format_version, layout, weights_file, diffusers_class (diffusers layout only)
    model          our model config (the dataclass as a dict, ``arch`` tagged), with
                   ``init_record``: what training was initialised from (model.init_from)
    diffusion      the run's diffusion section (objective, schedule, sampler defaults)
    data           {"max_text_tokens"}: the text length the loader padded to in training
    preprocess     the preprocess section that names the image and text encoders
    dataset_encoders   the encoders' identities from the dataset index (or null)
    provenance     run dir, checkpoint, step, samples seen, world size, ZeRO stage,
                   weights (ema|raw), dtype, EMA settings, export time, scaletrain version
    warnings       what the exporter noticed but did not refuse (e.g. encoder mismatch)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

EXPORT_FORMAT = "scaletrain-export"
FORMAT_VERSION = 1

SAFETENSORS = "safetensors"
DIFFUSERS = "diffusers"
LAYOUTS = (SAFETENSORS, DIFFUSERS)
WEIGHT_KINDS = ("ema", "raw")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

CONFIG_NAME = "config.json"  # ours in the safetensors layout; diffusers' in its layout
WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SIDECAR_NAME = "scaletrain.json"  # our metadata next to diffusers' config.json


class ExportError(RuntimeError):
    """An export cannot be written or read; the message names the file or option and why."""


def metadata_path(directory: str | Path) -> Path:
    """Where an export directory keeps our metadata (either layout)."""
    directory = Path(directory)
    sidecar = directory / SIDECAR_NAME
    return sidecar if sidecar.is_file() else directory / CONFIG_NAME


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The export metadata of ``directory``, checked to be ours and of a known version."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory}: no such export directory")
    path = metadata_path(directory)
    if not path.is_file():
        raise ExportError(
            f"{directory}: not a scaletrain export (neither {SIDECAR_NAME} nor {CONFIG_NAME}); "
            "write one with `scaletrain export`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable export metadata: {exc}") from exc
    if meta.get("format") != EXPORT_FORMAT:
        hint = (
            " (a plain diffusers model: sampling also needs the encoder and diffusion settings "
            f"that `scaletrain export` writes to {SIDECAR_NAME})"
            if "_class_name" in meta
            else ""
        )
        raise ExportError(f"{path}: not scaletrain export metadata{hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: export format_version {meta.get('format_version')!r}; this code reads "
            f"{FORMAT_VERSION}"
        )
    if meta.get("layout") not in LAYOUTS:
        raise ExportError(f"{path}: unknown layout {meta.get('layout')!r}")
    return meta
