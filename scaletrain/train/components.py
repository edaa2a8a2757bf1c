"""What the loop consumes from other components, gathered behind one small interface.

``real_components()`` wires the models, the diffusion objective and the latent-shard loader;
``synthetic_components()`` (``train.components: synthetic``) wires a toy denoiser on
generated tensors, so the engine can be tested and benchmarked on its own.

The contract the loop relies on:
  build_model(device) -> nn.Module       device "cpu"/"cuda:N", or "meta" (no memory)
  init_module(module)                    (re-)initialise a module's own parameters after
                                         allocating them; None: build_model("meta") is not
                                         supported and ZeRO-3 wraps build_model in zero.Init
  build_loader(rank, world, seed, state) -> loader: iterable of batch dicts with
                                         state_dict()/load_state_dict()
  merge_loader_states(states) -> state   per-rank states -> one state that build_loader
                                         accepts at any world size
  build_objective(loader) -> objective   objective(model_fn, batch, generator)
                                         -> (per_sample_loss[B], logs with "timesteps")
  make_model_fn(engine) -> model_fn
  forward_flops_per_sample() -> float    for TFLOP/s and MFU (0 when unknown)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Components:
    build_model: Callable[[str], torch.nn.Module]
    init_module: Callable[[torch.nn.Module], None] | None
    build_loader: Callable[[int, int, int, Any], Any]
    merge_loader_states: Callable[[list[Any]], Any]
    build_objective: Callable[[Any], Callable[..., tuple[torch.Tensor, dict[str, Any]]]]
    make_model_fn: Callable[[Any], Callable[..., Any]]
    forward_flops_per_sample: Callable[[], float]


def components_for(cfg) -> Components:
    if cfg.train.components == "synthetic":
        from scaletrain.train.synthetic import synthetic_components

        return synthetic_components(cfg)
    return real_components(cfg)


def real_components(cfg) -> Components:
    """The real model, objective and loader (issues 3, 4 and 6)."""
    from data_pipeline.loader import build_train_loader, merge_states
    from scaletrain.diffusion import build_objective
    from scaletrain.diffusion.conditioning import make_model_fn
    from scaletrain.models import build_model
    from scaletrain.models.layers import init_module_

    arch = cfg.model.arch

    def objective_for(loader):
        # The empty prompt's encoding is the "null" conditioning of CFG dropout.
        return build_objective(cfg.diffusion, null_cond=loader.empty_conditioning())

    def flops() -> float:
        from scaletrain.models.info import model_info

        try:
            return float(model_info(cfg.model, with_backward=False)["flops_per_sample"])
        except Exception:  # FLOP counting is for metrics only; never fail a run on it
            return 0.0

    return Components(
        build_model=lambda device: build_model(cfg.model, device=device),
        init_module=init_module_,
        build_loader=lambda rank, world, seed, state: build_train_loader(
            cfg.data, rank, world, seed, state=state
        ),
        merge_loader_states=merge_states,
        build_objective=objective_for,
        make_model_fn=lambda engine: make_model_fn(engine, arch),
        forward_flops_per_sample=flops,
    )
