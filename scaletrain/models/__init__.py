"""scaletrain/models: SDXL-style U-Net and SD3-style MMDiT as plain nn.Modules.

Public API::

    model = build_model(cfg)                  # cfg: UNetConfig | MMDiTConfig, on CPU
    model = build_model(cfg, device="meta")   # no memory: FLOP counting, deferred init
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

    ``device="meta"``: no memory at all, instant even for 8B parameters (FLOP counting,
    or materialise later with :func:`materialize_`, module by module).

    Any other device: each submodule allocates and initialises its own parameters on
    ``device`` as it is constructed, so weights are allocated module by module, never in
    one allocation; under DeepSpeed's ``zero.Init`` each module is partitioned right after
    its constructor, so no rank ever holds the whole model. Initialisation is
    deterministic given torch's RNG state and identical to building on meta and then
    calling ``materialize_``. ``dtype`` casts floating-point parameters afterwards.
    """
    arch = getattr(cfg, "arch", None)
    if arch not in _ARCHS:
        raise ValueError(f"model.arch: got {arch!r}; allowed: " + ", ".join(map(repr, _ARCHS)))
    with torch.device(device):
        model = _ARCHS[arch](cfg)
    if dtype is not None:
        model.to(dtype)
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
