"""DeepSpeed set-up: process group, the engine config, the (possibly partitioned) model.

The model code knows nothing of DeepSpeed; this module wraps it from outside. Under ZeRO-3
the model is built on the meta device and materialised one module at a time, each module
partitioned as soon as it is initialised, so no rank ever holds all weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from scaletrain.core.dist_env import DistEnv, free_port, import_deepspeed, set_default_pg_timeout
from scaletrain.models import build_model, materialize_, set_trainable_
from scaletrain.models.config import ModelConfig
from scaletrain.train.config import TrainConfig

deepspeed = import_deepspeed()

log = logging.getLogger(__name__)


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
    timeout = set_default_pg_timeout(cfg.dist_timeout_s)
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=resolve_backend(cfg), auto_mpi_discovery=False, verbose=False,
            rank=env.rank, world_size=env.world_size, timeout=timeout,
        )
    return device



def deepspeed_config(cfg: TrainConfig, micro_batch: int, world_size: int) -> dict[str, Any]:
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
        # No "optimizer" section: build_optimizer's AdamW is passed as the client optimizer.
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def use_fused_adam(device: torch.device) -> bool:
    """Fused AdamW (one multi-tensor kernel for all parameters) on CUDA; the plain for-each
    implementation elsewhere (the CPU, where the fused kernel brings nothing measurable)."""
    return torch.device(device).type == "cuda"


def build_optimizer(cfg: TrainConfig, params, fused: bool) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over ``params``: torch's, fused or not, one update
    rule either way. Torch's fused kernel rather than DeepSpeed's FusedAdam: it needs no JIT
    build of a CUDA extension at start-up, and it is the same class on every device."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def compile_model_(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Apply train.compile in place: ``blocks`` compiles each of ``model.blocks()`` on its own,
    ``model`` the whole forward. ``nn.Module.compile`` keeps every module and parameter name
    (no ``_orig_mod.`` wrapper), so checkpoints, EMA and exports are unchanged, and DeepSpeed
    still wraps the same module tree."""
    if mode == "none":
        return model
    if mode == "model":
        model.compile()
        return model
    blocks = model.blocks()
    for block in blocks:
        block.compile()
    log.info("train.compile=blocks: %d blocks compiled on their own", len(blocks))
    return model


def build_engine(cfg: TrainConfig, model_cfg: ModelConfig, micro_batch: int, world_size: int,
                 seed: int, device: torch.device):
    """Build the model (partitioned under ZeRO-3) and wrap it in a DeepSpeed engine."""
    ds_config = deepspeed_config(cfg, micro_batch, world_size)
    # Same seed on every rank: replicated stages start from identical weights without a
    # broadcast, and ZeRO-3 ranks agree on the values they partition.
    torch.manual_seed(seed)
    if cfg.zero_stage == 3:
        # Built on meta, then allocated, initialised, cast and partitioned one module at a
        # time in the order a real-device build initialises them, so a ZeRO-3 run starts from
        # the same weights as a ZeRO-1/2 one. zero.Init partitions rank 0's values. DeepSpeed's
        # zero.Init(module=m) would need m's children allocated too; converting each module's
        # own parameters keeps the peak at one module.
        partitioner = deepspeed.zero.Init(config_dict_or_path=ds_config)
        model = materialize_(
            build_model(model_cfg, device="meta"), device, dtype=partitioner.dtype,
            after_module=lambda m: partitioner._convert_to_zero_parameters(
                list(m.parameters(recurse=False))),
        )
    else:
        model = build_model(model_cfg, device="cpu")
    # Frozen parameters (model.trainable) are left out of the optimizer: no master, no moments.
    set_trainable_(model, model_cfg.trainable)
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    log.info("training %d of %d parameters%s", sum(n for n, train in sizes if train),
             sum(n for n, _ in sizes),
             f" (model.trainable={model_cfg.trainable!r})" if model_cfg.trainable else "")
    compile_model_(model, cfg.compile)
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad],
                                fused=use_fused_adam(device))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
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
