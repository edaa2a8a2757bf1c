"""DeepSpeed set-up: process group, the engine config, the (possibly partitioned) model.

The model code knows nothing of DeepSpeed; this module wraps it from outside. Under ZeRO-3
the model is constructed inside ``deepspeed.zero.Init`` so each parameter is partitioned as
soon as its module is built and no rank ever holds all weights.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import torch

from launch.env import DistEnv
from scaletrain.train.config import TrainConfig

log = logging.getLogger(__name__)


def import_deepspeed():
    """Import DeepSpeed with the right accelerator (CPU when there is no CUDA device).

    DeepSpeed picks its accelerator at import time; a CUDA build of torch on a machine
    without a GPU would otherwise select CUDA and fail later.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_backend(cfg: TrainConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: TrainConfig, env: DistEnv) -> torch.device:
    """Join the process group described by ``env`` and return this rank's device."""
    variables = env.as_torch_env()
    if env.source == "single" and "MASTER_PORT" not in os.environ:
        variables["MASTER_PORT"] = str(free_port())  # lone runs must not fight over 29500
    os.environ.update(variables)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    deepspeed = import_deepspeed()
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=resolve_backend(cfg), auto_mpi_discovery=False, verbose=False,
            rank=env.rank, world_size=env.world_size,
        )
    return device


def deepspeed_config(cfg: TrainConfig, micro_batch: int, world_size: int,
                     load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (no LR scheduler: the loop sets the LR)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        # bf16 weights and grads, fp32 master weights and Adam moments in the optimizer.
        # check_grad_overflow: a non-finite gradient norm skips the step on every rank.
        "bf16": {"enabled": cfg.bf16, "check_grad_overflow": True},
        "zero_optimization": {"stage": cfg.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.betas),
                "eps": cfg.eps,
                "weight_decay": cfg.weight_decay,
                # torch.optim.AdamW instead of DeepSpeed's fused kernels: runs on CPU.
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_engine(
    cfg: TrainConfig,
    build_model: Callable[[str], torch.nn.Module],
    micro_batch: int,
    world_size: int,
    seed: int,
    load_universal: bool = False,
):
    """Build the model (partitioned under ZeRO-3) and wrap it in a DeepSpeed engine."""
    deepspeed = import_deepspeed()
    ds_config = deepspeed_config(cfg, micro_batch, world_size, load_universal)
    # Same seed on every rank: replicated stages start from identical weights without a
    # broadcast, and ZeRO-3 ranks agree on the values they partition.
    torch.manual_seed(seed)
    if cfg.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model("cpu")
    else:
        model = build_model("cpu")
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=ds_config, model_parameters=[p for p in model.parameters()
                                                         if p.requires_grad],
    )
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def step_was_skipped(engine) -> bool:
    """Whether DeepSpeed discarded the last optimizer step (non-finite gradients)."""
    if bool(getattr(engine.optimizer, "overflow", False)):
        return True
    norm = engine.get_global_grad_norm()
    if norm is None:
        return False
    norm = float(norm)
    return norm != norm or norm in (float("inf"), float("-inf"))
