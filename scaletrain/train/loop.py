"""The training loop: one function, short and explicit.

    batch -> objective -> backward -> step -> EMA -> metrics -> checkpoint

Progress is counted in optimizer steps and samples seen. Every micro-batch draws its noise,
timesteps and CFG dropout from a generator seeded by (seed, rank, samples seen, micro-batch),
so a resumed run draws exactly what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from launch.env import DistEnv, dist_env_from_environ
from scaletrain.config_base import dump_yaml, to_dict
from scaletrain.train import checkpoint as ckpt_io
from scaletrain.train.components import Components, components_for
from scaletrain.train.ema import ShardedEMA, master_weight_fragments
from scaletrain.train.engine import (
    build_engine,
    cast_inputs,
    init_distributed,
    set_lr,
    step_was_skipped,
)
from scaletrain.train.lr import lr_at
from scaletrain.train.signals import PreemptionFlag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    status: Literal["completed", "preempted"]
    step: int
    samples_seen: int


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


def step_seed(seed: int, rank: int, samples_seen: int, micro: int) -> int:
    """A 63-bit seed from (seed, rank, samples seen, micro-batch) via numpy's SeedSequence,
    which hashes its entropy words so neighbouring tuples give unrelated streams."""
    words = np.random.SeedSequence([seed, rank, samples_seen, micro]).generate_state(2)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _broadcast_object(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_training(cfg, run_dir: str | Path) -> TrainOutcome:
    """Train (or resume) a run in ``run_dir``; this process's rank comes from its environment.

    Every process of the job calls this (the local launcher, torchrun or SLURM start them).
    Returns "completed" at train.max_steps, or "preempted" after SIGUSR1/SIGTERM made it
    save a checkpoint. Raises NonFiniteTrainingError after too many skipped steps.
    """
    env = dist_env_from_environ()
    # Handlers first: a SIGTERM during the (slow) start-up must not kill the process; the
    # flag is honoured at the first step boundary.
    with PreemptionFlag() as preempt:
        device = init_distributed(cfg.train, env)
        import torch.distributed as dist

        try:
            return _Run(cfg, Path(run_dir), env, device, components_for(cfg), preempt).train()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class _Run:
    """State of one training process; ``train()`` is the loop."""

    def __init__(self, cfg, run_dir: Path, env: DistEnv, device: torch.device,
                 parts: Components, preempt: PreemptionFlag) -> None:
        self.cfg, self.run_dir, self.env, self.device = cfg, run_dir, env, device
        self.parts, self.preempt = parts, preempt
        self.rank, self.world = env.rank, env.world_size
        t = cfg.train
        self.global_batch = cfg.data.batch_size * t.grad_accum * self.world

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if self.rank == 0:
            from scaletrain.config import save_config

            save_config(cfg, self.run_dir)
        found = ckpt_io.find_latest(self.run_dir) if cfg.checkpoint.resume else None
        resume = _broadcast_object(str(found) if found is not None else None)
        self.resume_dir = Path(resume) if resume else None
        saved = ckpt_io.read_state(self.resume_dir) if self.resume_dir else None
        if saved is not None:
            ckpt_io.check_resumable(self.resume_dir, saved, t.zero_stage)
        universal = bool(saved) and ckpt_io.needs_universal(saved, self.world)
        if universal:
            if self.rank == 0:
                ckpt_io.ensure_universal(self.resume_dir)
            import torch.distributed as dist

            dist.barrier()

        self.engine = build_engine(
            t, self.parts.build_model, self.parts.init_module, cfg.data.batch_size, self.world,
            cfg.seed, self.device, load_universal=universal,
        )
        self.model_fn = cast_inputs(self.parts.make_model_fn(self.engine),
                                    torch.bfloat16 if t.bf16 else torch.float32)
        self.step = 0
        self.samples_seen = 0
        self.skipped_total = 0
        loader_state = None
        if saved is not None:
            ckpt_io.load_engine_state(self.engine, self.resume_dir, universal)
            self.step = saved["step"]
            self.samples_seen = saved["samples_seen"]
            self.skipped_total = saved.get("skipped_steps", 0)
            if saved["world_size"] == self.world:
                loader_state = ckpt_io.load_rank_file(self.resume_dir, "data", self.rank)
                ckpt_io.set_rng_state(ckpt_io.load_rank_file(self.resume_dir, "rng", self.rank))
            else:
                states = [torch.load(p, map_location="cpu", weights_only=False)
                          for p in ckpt_io.rank_files(self.resume_dir, "data")]
                loader_state = self.parts.merge_loader_states(states)
            log.info("resumed from %s at step %d (%d samples seen)%s", self.resume_dir,
                     self.step, self.samples_seen,
                     f", world size {saved['world_size']} -> {self.world}" if universal else "")
        self.ema = None
        if cfg.ema.enabled:
            fragments = master_weight_fragments(
                self.engine.module.named_parameters(), self.rank, self.world)
            self.ema = ShardedEMA(cfg.ema, fragments)
            if saved is not None:
                self.ema.load_shards(ckpt_io.rank_files(self.resume_dir, "ema"))
        self.loader = self.parts.build_loader(self.rank, self.world, cfg.seed, loader_state)
        self.objective = self.parts.build_objective(self.loader)

        from scaletrain.train.monitor import (
            DiagnosticsSchedule,
            LossByTimestep,
            MetricsLogger,
            Throughput,
        )

        self.metrics = MetricsLogger(cfg.logging, self.run_dir, self.rank, to_dict(cfg),
                                     resume_step=self.step if saved is not None else None)
        self.throughput = Throughput(self.parts.forward_flops_per_sample(), self.world,
                                     self.device, cfg.logging.peak_tflops)
        self.throughput.load_state_dict({"skipped_steps": self.skipped_total})
        self.loss_by_t = LossByTimestep(cfg.logging.loss_buckets)
        self.diagnostics = DiagnosticsSchedule(cfg.logging.diagnostics_every)
        self.validator = None
        if cfg.validation.every > 0:
            if t.components == "synthetic":
                log.warning("validation.every is ignored with train.components=synthetic")
            else:
                from scaletrain.train.validation_setup import build_validator

                self.validator = build_validator(cfg, self.run_dir, self.rank, self.device,
                                                 self.metrics, self.loader)

    # ------------------------------------------------------------------ loop

    def train(self) -> TrainOutcome:
        self._setup()
        cfg, t = self.cfg, self.cfg.train
        log.info("training: world %d, ZeRO-%d, bf16=%s, global batch %d, steps %d -> %d",
                 self.world, t.zero_stage, t.bf16, self.global_batch, self.step, t.max_steps)
        from scaletrain.train.monitor import (
            diagnostics_metrics,
            pop_model_diagnostics,
            set_model_diagnostics,
        )

        bar = _progress_bar(t.progress_bar and self.rank == 0, self.step, t.max_steps)
        batches = iter(self.loader)
        consecutive_skips = 0
        losses: list[float] = []  # mean loss of each applied step since the last log
        status: Literal["completed", "preempted"] = "completed"
        self.throughput.start()
        try:
            while self.step < t.max_steps:
                lr = lr_at(t, self.step)
                set_lr(self.engine, lr)
                collect = self.diagnostics.should_collect(self.step + 1)
                set_model_diagnostics(self.engine.module, collect)
                loss_sum, nonfinite = 0.0, 0.0
                for micro in range(t.grad_accum):
                    with self.throughput.waiting_for_data():
                        batch = _to_device(next(batches), self.device)
                    gen = torch.Generator(device=self.device).manual_seed(
                        step_seed(cfg.seed, self.rank, self.samples_seen, micro))
                    per_sample, logs = self.objective(self.model_fn, batch, gen)
                    loss = per_sample.float().mean()
                    if self.step in t.inject_nan_steps and self.rank == t.inject_nan_rank:
                        loss = loss * float("nan")  # fault injection (tests)
                    value = float(loss.detach())
                    if math.isfinite(value):
                        loss_sum += value
                        if "timesteps" in logs:
                            self.loss_by_t.add(logs["timesteps"], per_sample.float())
                    else:
                        nonfinite += 1
                    self.engine.backward(loss)
                    self.engine.step()  # DeepSpeed steps the optimizer at the last micro
                # A NaN loss anywhere makes every rank's reduced gradients NaN, so DeepSpeed
                # skips the update on all ranks; the all-reduce makes the count agree too.
                loss_sum, nonfinite, preempt_flag = _all_reduce(
                    [loss_sum, nonfinite, float(self.preempt.is_set)], self.device)
                skipped = step_was_skipped(self.engine) or nonfinite > 0
                self.step += 1
                self.samples_seen += self.global_batch
                self.throughput.step_done(self.global_batch, skipped=skipped)
                if skipped:
                    self.skipped_total += 1
                    consecutive_skips += 1
                    log.warning("step %d skipped: non-finite loss or gradient norm "
                                "(%d in a row)", self.step, consecutive_skips)
                    if consecutive_skips >= t.max_consecutive_skips:
                        raise NonFiniteTrainingError(
                            f"{consecutive_skips} consecutive steps had a non-finite loss or "
                            f"gradient norm (train.max_consecutive_skips="
                            f"{t.max_consecutive_skips}); stopping at step {self.step}. The "
                            f"last good checkpoint is kept in "
                            f"{ckpt_io.checkpoints_dir(self.run_dir)}"
                        )
                else:
                    consecutive_skips = 0
                    losses.append(loss_sum / (self.world * t.grad_accum))
                    if self.ema is not None:
                        self.ema.update(self.samples_seen, self.global_batch)
                if bar is not None:
                    bar.update(1)
                    if losses:
                        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
                diag = pop_model_diagnostics(self.engine.module) if collect else {}
                if self.step % cfg.logging.every == 0 or self.step == t.max_steps or collect:
                    self._log(lr, losses, diagnostics_metrics(diag))
                    losses = []
                if self.validator is not None and self.validator.should_run(self.step):
                    set_model_diagnostics(self.engine.module, False)
                    self._validate()
                stop = preempt_flag > 0 and self.step < t.max_steps  # at the end: just finish
                if self.step % cfg.checkpoint.every == 0 or self.step == t.max_steps or stop:
                    self._save()
                if stop:
                    status = "preempted"
                    log.warning("preempted: checkpoint saved at step %d", self.step)
                    break
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()
            close = getattr(self.loader, "close", None)
            if callable(close):
                close()  # stop DataLoader workers now, not at interpreter exit
        return TrainOutcome(status, self.step, self.samples_seen)

    def _log(self, lr: float, losses: list[float], extra: dict[str, float]) -> None:
        """Collective (every rank calls it at the same steps); rank 0 writes."""
        self.loss_by_t.all_reduce()
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "skipped_steps": self.skipped_total,
            **self.throughput.summary(),
            **self.loss_by_t.summary(),
            **extra,
        }
        if self.ema is not None:
            metrics["ema_updates"] = self.ema.updates
        loader_metrics = getattr(self.loader, "metrics", None)
        if callable(loader_metrics):
            metrics.update({f"data/{k}": v for k, v in loader_metrics().items()
                            if isinstance(v, (int, float))})
        self.metrics.log(self.step, metrics, samples_seen=self.samples_seen)

    def _validate(self) -> None:
        """Sample the validation prompts from the EMA weights (collective on every rank)."""
        module = self.engine.module
        module.eval()
        try:
            with torch.no_grad(), (self.ema.swapped_into(module) if self.ema is not None
                                   else contextlib.nullcontext()):
                self.validator.run(self.step, self.model_fn)
        finally:
            module.train()

    def _save(self) -> None:
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "world_size": self.world,
            "zero_stage": self.cfg.train.zero_stage,
            "global_batch": self.global_batch,
            "skipped_steps": self.skipped_total,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "time": time.time(),
        }
        ckpt_io.save_checkpoint(
            self.run_dir, self.step, engine=self.engine, ema=self.ema,
            loader_state=self.loader.state_dict(), state=state,
            config_yaml=dump_yaml(self.cfg), rank=self.rank,
            keep_last=self.cfg.checkpoint.keep_last,
        )


def _progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
