"""What the loop consumes from other components, gathered behind one small interface.

``real_components()`` wires the models, the diffusion objective and the latent-shard loader;
``synthetic_components()`` (``train.components: synthetic``) wires a toy denoiser on
generated tensors, so the engine can be tested and benchmarked on its own.

The contract the loop relies on:
  build_model(device) -> nn.Module                       (built inside zero.Init for ZeRO-3)
  build_loader(rank, world, seed, state) -> loader        iterable of batch dicts with
                                                          state_dict()/load_state_dict()
  merge_loader_states(states) -> state                    per-rank states -> one state that
                                                          build_loader accepts at any world size
  objective(model_fn, batch, generator) -> (per_sample_loss[B], logs)
  make_model_fn(engine) -> model_fn
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Components:
    build_model: Callable[[str], torch.nn.Module]
    build_loader: Callable[[int, int, int, Any], Any]
    merge_loader_states: Callable[[list[Any]], Any]
    objective: Callable[..., tuple[torch.Tensor, dict[str, Any]]]
    make_model_fn: Callable[[Any], Callable[..., Any]]


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

    arch = cfg.model.arch
    return Components(
        build_model=lambda device: build_model(cfg.model, device=device),
        build_loader=lambda rank, world, seed, state: build_train_loader(
            cfg.data, rank, world, seed, state=state
        ),
        merge_loader_states=merge_states,
        objective=build_objective(cfg.diffusion),
        make_model_fn=lambda engine: make_model_fn(engine, arch),
    )
