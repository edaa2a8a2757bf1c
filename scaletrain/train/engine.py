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

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op that
        # only inference uses; the build takes minutes on a busy machine and serialises every
        # process on one lock file. Training only needs gloo, so mark the op unavailable.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
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
    init_module: Callable[[torch.nn.Module], None] | None,
    micro_batch: int,
    world_size: int,
    seed: int,
    device: torch.device,
    load_universal: bool = False,
):
    """Build the model (partitioned under ZeRO-3) and wrap it in a DeepSpeed engine."""
    deepspeed = import_deepspeed()
    ds_config = deepspeed_config(cfg, micro_batch, world_size, load_universal)
    # Same seed on every rank: replicated stages start from identical weights without a
    # broadcast, and ZeRO-3 ranks agree on the values they partition.
    torch.manual_seed(seed)
    if cfg.zero_stage == 3 and init_module is not None:
        model = build_partitioned_model(build_model, init_module, ds_config, device)
    elif cfg.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model("cpu")
    else:
        model = build_model("cpu")
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=ds_config, model_parameters=[p for p in model.parameters()
                                                         if p.requires_grad],
    )
    return engine


def build_partitioned_model(build_model, init_module, ds_config, device: torch.device):
    """ZeRO-3: build on the meta device, then allocate, initialise and partition one module
    at a time, in the same order as scaletrain.models.materialize_ (so a ZeRO-3 run starts
    from the same weights as a ZeRO-1/2 one). The peak is one module's weights, never the
    whole model; zero.Init partitions rank 0's values, so every rank agrees."""
    deepspeed = import_deepspeed()
    model = build_model("meta")
    partitioner = deepspeed.zero.Init(config_dict_or_path=ds_config)
    for module in model.modules():
        direct = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not any(t.is_meta for t in direct):
            continue
        module.to_empty(device=device, recurse=False)
        init_module(module)
        # Initialise in fp32, then store in the working dtype, as zero.Init's tensor
        # constructors (and the engine's module.to(bf16) for ZeRO-1/2) would.
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(partitioner.dtype)
        # DeepSpeed's zero.Init(module=m) partitions all of m's parameters at once, which
        # would need the children allocated too; this converts only the ones just built.
        partitioner._convert_to_zero_parameters(list(module.parameters(recurse=False)))
    return model


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


def cast_inputs(model_fn: Callable, dtype: torch.dtype) -> Callable:
    """Wrap ``model_fn(x, t, cond)`` so the noisy input and floating conditioning reach the
    model in its working dtype (bf16 weights reject fp32 inputs). Timesteps stay fp32: the
    models embed them in fp32 before casting, and bf16 cannot hold t = 999 exactly."""

    def cast(v):
        return v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v

    def fn(x, t, cond):
        return model_fn(cast(x), t, {k: cast(v) for k, v in cond.items()})

    return fn
