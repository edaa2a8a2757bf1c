"""Configs of the training engine (issue 7): optimisation, EMA, checkpoints.

Each dataclass is one section of the root config (``train``, ``ema``, ``checkpoint``).
Counts are in optimizer steps unless a name says otherwise; the loop also counts samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from scaletrain.core.config_base import require


@dataclass
class TrainConfig:
    """Optimisation and the DeepSpeed engine."""

    max_steps: int = 1000
    # AdamW (Loshchilov & Hutter 2019): decoupled weight decay.
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    # LR: linear warm-up from 0 over warmup_steps, then constant or cosine decay to min_lr.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 1.0  # global L2 norm; 0 turns clipping off
    grad_accum: int = 1  # micro-batches per optimizer step (data.batch_size each)
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = True
    # torch.compile (inductor). "blocks": each transformer block and ResBlock compiled on its
    # own (regional compilation, as torchtitan): repeated blocks share one graph, so compile
    # time stays flat in depth. "model": the whole forward as one graph (longer compile, may
    # fuse across blocks). Turn it on for GPU runs long enough to repay the first step's
    # compile; ZeRO-1/2 only, with or without gradient checkpointing.
    compile: Literal["none", "blocks", "model"] = "none"
    # "auto": nccl when CUDA is available, else gloo on CPU.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # A non-finite loss or gradient norm skips the update on every rank; this many in a row
    # stops the run (the last good checkpoint stays).
    max_consecutive_skips: int = 5
    # A finite but destructive update (an LR spike) is caught at each checkpoint: a
    # non-finite global L2 norm of the fp32 weights or of the EMA, or one above this, stops
    # the run. Pruning never removes the newest healthy checkpoint.
    max_weight_norm: float = 1.0e6
    # A step loss above this factor x the running median of the mean losses of the last 20
    # logging windows (logging.every steps each) marks the next checkpoint unhealthy (0 = off).
    loss_spike_factor: float = 20.0
    # A tqdm bar on rank 0's console besides the progress line (logging.every); off by
    # default: the line says more, and a bar's redraws garble log files (SLURM, train.log).
    progress_bar: bool = False
    # On a resume at another global batch (another world size): scale lr and min_lr linearly
    # with the global batch, relative to the one the run started with (state.json's
    # lr_batch). False keeps train.lr; the resume's warning line says the LR in use.
    scale_lr_with_batch: bool = False
    # Seconds a collective (and every process group's rendezvous) may wait for a peer before
    # it fails, instead of torch's 30 min default; also how long a rank may go without a
    # heartbeat before the launcher (or rank 0) ends the job for a requeue. 600 s leaves
    # room for a slow checkpoint write or a first-step compile on a real cluster.
    dist_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        require(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(len(self.betas) == 2, "betas", f"needs two values, got {self.betas}")
        require(
            all(0.0 <= b < 1.0 for b in self.betas), "betas", f"must be in [0, 1), got {self.betas}"
        )
        require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(
            0.0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}"
        )
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        require(self.dist_timeout_s > 0, "dist_timeout_s",
                f"must be > 0 seconds, got {self.dist_timeout_s}")
        require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        require(
            self.max_consecutive_skips >= 1,
            "max_consecutive_skips",
            f"must be >= 1, got {self.max_consecutive_skips}",
        )
        require(self.max_weight_norm > 0, "max_weight_norm",
                f"must be > 0, got {self.max_weight_norm}")
        require(self.loss_spike_factor == 0 or self.loss_spike_factor > 1, "loss_spike_factor",
                f"must be 0 (off) or > 1, got {self.loss_spike_factor}")
        # ZeRO-3 gathers each module's parameters in hooks around every submodule's forward;
        # dynamo traces into them and recompiles per module id until it gives up (measured:
        # the tiny MMDiT hit the recompile limit in 4 DeepSpeed hooks, slower than eager).
        require(
            self.compile == "none" or self.zero_stage != 3,
            "compile",
            f"{self.compile!r} does not work with zero_stage 3 (ZeRO-3's parameter-gather "
            "hooks break the compiled graphs); use zero_stage 1 or 2, or compile: none",
        )
        # DeepSpeed's plain (ZeRO-0, fp32) path applies a step with non-finite gradients;
        # every other path skips it on all ranks, which the fault handling relies on.
        require(
            self.zero_stage > 0 or self.bf16,
            "zero_stage",
            "ZeRO stage 0 needs bf16: true (fp32 without ZeRO cannot skip non-finite steps)",
        )


@dataclass
class EMAConfig:
    """Exponential moving average of the fp32 master weights, sharded like the optimizer.

    schedule:
      constant  beta = decay
      warmup    beta = min(decay, (1 + n) / (10 + n)), n = updates so far
      power     EDM2 power function (Karras et al. 2024, eq. 2 and sec. 3.1):
                beta = (1 - batch / samples)^(gamma + 1), gamma solved from sigma_rel
    """

    enabled: bool = True
    schedule: Literal["constant", "warmup", "power"] = "constant"
    decay: float = 0.9999
    sigma_rel: float = 0.05  # relative std of the power-function profile (EDM2)

    def __post_init__(self) -> None:
        require(0.0 <= self.decay < 1.0, "decay", f"must be in [0, 1), got {self.decay}")
        # sigma_rel must leave gamma > 0: sigma_rel^2 < 1/12 at gamma = 0 (EDM2 eq. 3).
        require(
            0.0 < self.sigma_rel < 0.28,
            "sigma_rel",
            f"must be in (0, 0.28), got {self.sigma_rel}",
        )


@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps between checkpoints
    keep_last: int = 3
    resume: bool = True  # continue from run_dir/checkpoints/latest when present
    # Save in the background: save() copies this rank's checkpoint to host memory (the
    # training stall) and a thread writes, fsyncs and hashes it while training goes on;
    # COMPLETE still comes last. Keeps a host-memory copy of this rank's checkpoint bytes
    # (weights, master weights, optimizer moments, EMA shard) from the first save on,
    # refilled in place by each save (allocating it anew every time stalled as long as a
    # synchronous save).
    async_save: bool = False

    def __post_init__(self) -> None:
        require(self.every > 0, "every", f"must be > 0, got {self.every}")
        require(self.keep_last > 0, "keep_last", f"must be > 0, got {self.keep_last}")
