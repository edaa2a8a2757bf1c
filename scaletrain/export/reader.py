"""An export directory (either layout) -> a ready model plus the configs that go with it."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from scaletrain.core.config_base import from_dict
from scaletrain.data.preprocess.config import PreprocessConfig
from scaletrain.diffusion.config import DiffusionConfig
from scaletrain.export.layout import (
    DIFFUSERS,
    DIFFUSERS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    ExportError,
    read_metadata,
)
from scaletrain.models import build_model
from scaletrain.models.config import MMDiTConfig, ToyConfig, UNetConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedExport:
    """A model ready for ``make_model_fn(model, arch)`` and what sampling needs with it."""

    model: nn.Module
    arch: str
    model_config: Any  # UNetConfig | MMDiTConfig
    diffusion: Any  # DiffusionConfig
    preprocess: Any  # PreprocessConfig
    max_text_tokens: int
    metadata: dict[str, Any]
    path: Path


def model_config_from_dict(data: dict[str, Any]):
    classes = {"unet": UNetConfig, "mmdit": MMDiTConfig, "toy": ToyConfig}
    arch = data.get("arch")
    if arch not in classes:
        raise ExportError(f"model.arch: got {arch!r}; allowed: {', '.join(classes)}")
    return from_dict(classes[arch], data, "model")


def export_configs(meta: dict[str, Any]) -> tuple[Any, Any, Any, int]:
    """(model config, diffusion config, preprocess config, max_text_tokens) of an export."""
    model_cfg = model_config_from_dict(meta["model"])
    diffusion = from_dict(DiffusionConfig, meta["diffusion"], "diffusion")
    preprocess = from_dict(PreprocessConfig, meta["preprocess"], "preprocess")
    return model_cfg, diffusion, preprocess, int(meta["data"]["max_text_tokens"])


def _load_ours(path: Path, model_cfg, device, dtype) -> nn.Module:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ExportError(f"{weights}: missing (the export's weights file)")
    state = load_file(str(weights), device="cpu")
    model = build_model(model_cfg, device="meta")
    try:
        # assign=True: the loaded tensors become the parameters (no second copy in memory).
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ExportError(f"{weights}: does not fit the model in its config.json: {exc}") from exc
    return model.to(device=device, dtype=dtype)


def _load_diffusers(path: Path, meta: dict[str, Any], device, dtype) -> nn.Module:
    import diffusers  # only for this layout: it costs ~4 s to import (see writer.py)

    name = meta.get("diffusers_class")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise ExportError(f"{path}: unknown diffusers class {name!r}")
    if not (path / DIFFUSERS_WEIGHTS_NAME).is_file():
        raise ExportError(f"{path / DIFFUSERS_WEIGHTS_NAME}: missing (the export's weights file)")
    # accelerate (optional) lets diffusers load without first initialising random weights.
    fast = importlib.util.find_spec("accelerate") is not None
    model = cls.from_pretrained(str(path), torch_dtype=dtype, low_cpu_mem_usage=fast)
    return model.to(device)


def load_export(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    preprocess=None,
) -> LoadedExport:
    """Load an export written by ``scaletrain export`` (either layout) in eval mode.

    ``preprocess`` (a PreprocessConfig) replaces the export's record of its encoders.
    """
    path = Path(path)
    meta = read_metadata(path)
    model_cfg, diffusion, recorded, max_tokens = export_configs(meta)
    if meta["layout"] == DIFFUSERS:
        model = _load_diffusers(path, meta, device, dtype)
    else:
        model = _load_ours(path, model_cfg, device, dtype)
    model.eval().requires_grad_(False)
    prov = meta.get("provenance", {})
    log.info("loaded %s (%s layout, %s weights of step %s)", path, meta["layout"],
             prov.get("weights"), prov.get("step"))
    return LoadedExport(
        model=model,
        arch=model_cfg.arch,
        model_config=model_cfg,
        diffusion=diffusion,
        preprocess=preprocess if preprocess is not None else recorded,
        max_text_tokens=max_tokens,
        metadata=meta,
        path=path,
    )
