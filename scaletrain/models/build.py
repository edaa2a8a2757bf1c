"""Build a model from its config, on a device or on the meta device, and materialise it.

No torch.distributed, deepspeed or wandb here: the engine wraps the model from outside (and
passes its partitioner to :func:`materialize_` as ``after_module``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn as nn

from scaletrain.core.config_base import ConfigError
from scaletrain.models.config import ModelConfig
from scaletrain.models.layers import init_module_
from scaletrain.models.mmdit import MMDiT
from scaletrain.models.toy import ToyDenoiser
from scaletrain.models.unet import UNet2DConditionModel

ARCHS: dict[str, type[nn.Module]] = {
    "unet": UNet2DConditionModel,
    "mmdit": MMDiT,
    "toy": ToyDenoiser,
}


def build_model(
    cfg: ModelConfig,
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
    if arch not in ARCHS:
        raise ValueError(f"model.arch: got {arch!r}; allowed: " + ", ".join(map(repr, ARCHS)))
    with torch.device(device):
        model = ARCHS[arch](cfg)
    if dtype is not None:
        model.to(dtype)
    return model


def materialize_(
    model: nn.Module,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    after_module: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Allocate every meta parameter on ``device`` and initialise it, one module at a time.

    Modules that already hold real tensors are left alone, so this also completes a
    partially materialised model. Each module is initialised in fp32, then its floating-point
    parameters and buffers are cast to ``dtype`` if given (as ``module.to(dtype)`` would), and
    ``after_module(module)`` runs (a ZeRO-3 engine partitions the module's parameters there,
    so the peak is one module's weights, never the whole model). The order of modules is
    ``model.modules()``, the order in which constructors initialise on a real device, so the
    weights equal those of ``build_model(cfg, device)`` from the same RNG state.
    """
    for module in model.modules():
        direct = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not any(t.is_meta for t in direct):
            continue
        module.to_empty(device=device, recurse=False)
        init_module_(module)
        if dtype is not None:
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if tensor.is_floating_point():
                    tensor.data = tensor.data.to(dtype)
        if after_module is not None:
            after_module(module)
    return model


def set_trainable_(model: nn.Module, pattern: str | None) -> int:
    """Freeze every parameter whose name ``pattern`` does not match (``re.search``); return how
    many parameters (elements) train. ``None`` trains all. A pattern that matches no name is a
    mistake, never a run that trains nothing."""
    params = list(model.named_parameters())
    if pattern is None:
        return sum(p.numel() for _, p in params)
    regex = re.compile(pattern)
    for name, p in params:
        p.requires_grad_(regex.search(name) is not None)
    if not any(p.requires_grad for _, p in params):
        example = ", ".join(name for name, _ in params[:3])
        raise ConfigError(f"model.trainable: {pattern!r} matches none of the model's "
                          f"{len(params)} parameter names (e.g. {example})")
    return sum(p.numel() for _, p in params if p.requires_grad)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
