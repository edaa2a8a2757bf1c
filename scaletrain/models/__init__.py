"""scaletrain/models: SDXL-style U-Net and SD3-style MMDiT as plain nn.Modules.

Public API::

    model = build_model(cfg)                  # cfg: UNetConfig | MMDiTConfig, on CPU
    model = build_model(cfg, device="meta")   # no memory: for ZeRO-3 or FLOP counting
    materialize_(model, device="cuda", dtype=torch.bfloat16)   # later, module by module
    model.config                              # the config dataclass
    model.set_gradient_checkpointing(True)
    model.set_diagnostics(True); ...; model.pop_diagnostics() -> dict[str, float]

No torch.distributed, deepspeed or wandb here: the engine wraps the model from outside.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from scaletrain.models.config import MMDiTConfig, UNetConfig
from scaletrain.models.layers import init_module_
from scaletrain.models.mmdit import MMDiT
from scaletrain.models.unet import UNet2DConditionModel

__all__ = [
    "MMDiT",
    "MMDiTConfig",
    "UNet2DConditionModel",
    "UNetConfig",
    "build_model",
    "count_parameters",
    "materialize_",
]

_ARCHS: dict[str, type[nn.Module]] = {"unet": UNet2DConditionModel, "mmdit": MMDiT}


def build_model(
    cfg: UNetConfig | MMDiTConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the model ``cfg.arch`` names; ``model.config`` is ``cfg``.

    The module tree is always constructed on the meta device (no memory, instant even for
    8B parameters). Unless ``device == "meta"``, each submodule is then allocated on
    ``device`` and initialised in turn (:func:`materialize_`), so no single allocation ever
    holds all the weights. Initialisation is deterministic given torch's RNG state.
    """
    arch = getattr(cfg, "arch", None)
    if arch not in _ARCHS:
        raise ValueError(f"model.arch: got {arch!r}; allowed: " + ", ".join(map(repr, _ARCHS)))
    with torch.device("meta"):
        model = _ARCHS[arch](cfg)
    if torch.device(device).type != "meta":
        materialize_(model, device, dtype)
    return model


def materialize_(
    model: nn.Module, device: str | torch.device, dtype: torch.dtype | None = None
) -> nn.Module:
    """Allocate every meta parameter on ``device`` and initialise it, one module at a time.

    Modules that already hold real tensors are left alone, so this also completes a
    partially materialised model. Floating-point tensors are cast to ``dtype`` if given.
    """
    for module in model.modules():
        direct = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not any(t.is_meta for t in direct):
            continue
        module.to_empty(device=device, recurse=False)
        init_module_(module)
        if dtype is not None:
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
