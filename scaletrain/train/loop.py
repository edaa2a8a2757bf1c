"""The training loop: one short function, explicit about what happens in a step.

    batch -> objective -> backward -> step -> EMA -> metrics -> checkpoint

Progress is counted in optimizer steps and samples seen. Every micro-batch draws its noise,
timesteps and CFG dropout from a generator seeded by (seed, rank, samples seen, micro-batch),
so a resumed run draws exactly what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from scaletrain.core.config_base import dump_yaml, save_config, to_dict
from scaletrain.core.dist_env import dist_env_from_environ
from scaletrain.core.heartbeat import HEARTBEAT_DIR_ENV, Heartbeat
from scaletrain.core.run_dir import (
    checkpoints_dir,
    eval_dir,
    heartbeat_dir,
    newest_healthy,
    run_lock,
)
from scaletrain.data.loader import build_train_loader
from scaletrain.diffusion import build_objective
from scaletrain.diffusion.conditioning import ModelFn, cast_inputs, make_model_fn
from scaletrain.eval import EvalSetting, Evaluator
from scaletrain.models.info import model_info, training_flops
from scaletrain.train.checkpoint import RNG, CheckpointManager, PerRank, TrainState, loader_state
from scaletrain.train.ema import ShardedEMA, master_weight_fragments
from scaletrain.train.engine import build_engine, init_distributed, set_lr, step_was_skipped
from scaletrain.train.init_weights import open_init_source, start_weights
from scaletrain.train.lr import lr_at
from scaletrain.train.monitor.diagnostics import (
    DiagnosticsSchedule,
    diagnostics_metrics,
    pop_model_diagnostics,
    set_model_diagnostics,
)
from scaletrain.train.monitor.evaluation import TrainingEvaluation
from scaletrain.train.monitor.metrics_logger import MetricsLogger
from scaletrain.train.monitor.throughput import Throughput
from scaletrain.train.monitor.timestep_loss import LossByTimestep
from scaletrain.train.monitor.validation import Validator
from scaletrain.train.preflight import describe_world_change, lr_batch, train_config_in_use
from scaletrain.train.signals import PreemptionFlag

log = logging.getLogger(__name__)
# The per-step console line; its own name so that it reads "scaletrain.progress: step 5/20 ...".
progress = logging.getLogger("scaletrain.progress")


@dataclass(frozen=True)
class TrainOutcome:
    status: Literal["completed", "preempted"]
    step: int
    samples_seen: int
    # For the end-of-run summary (rank 0 prints it).
    steps_run: int = 0  # steps taken by this process (not counting those before a resume)
    samples_run: int = 0
    seconds: float = 0.0  # wall time of the training loop
    skipped_steps: int = 0
    last_grid: str | None = None  # the newest validation grid, if any


def progress_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    """The one console line printed every logging.every steps (and into RUN_DIR/train.log)."""
    def get(key: str) -> float:
        value = metrics.get(key)
        return float(value) if isinstance(value, (int, float)) else float("nan")

    step_time = get("perf/step_time_s")
    eta = (total - step) * step_time
    eta_text = (str(datetime.timedelta(seconds=round(eta))) if math.isfinite(eta) else "?")
    mfu = get("perf/mfu")
    return (
        f"step {step}/{total} | loss {get('loss'):.4f} | lr {get('lr'):.2e} | "
        f"{get('perf/samples_per_s'):.1f} samples/s | "
        f"MFU {'n/a' if not math.isfinite(mfu) else f'{100 * mfu:.1f}%'} | "
        f"data wait {100 * get('perf/data_wait_frac'):.1f}% | "
        f"peak mem {get('perf/peak_mem_gib'):.2f} GiB | ETA {eta_text}"
    )


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm, or an update left
    non-finite or exploding weights (train.max_weight_norm)."""


def kept_checkpoint_note(run_dir: Path) -> str:
    """The stop message's last sentence: which checkpoint to go back to (the newest healthy
    one, which pruning never removes)."""
    healthy = newest_healthy(run_dir)
    if healthy is None:
        return f"No healthy checkpoint in {checkpoints_dir(run_dir)}."
    return (f"The last healthy checkpoint is kept: {healthy} (newer ones hold the damaged "
            "state; move them aside to resume from it).")


def step_seed(seed: int, rank: int, samples_seen: int, micro: int) -> int:
    """A 63-bit seed from (seed, rank, samples seen, micro-batch) via numpy's SeedSequence,
    which hashes its entropy words so neighbouring tuples give unrelated streams."""
    words = np.random.SeedSequence([seed, rank, samples_seen, micro]).generate_state(2)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


@dataclass
class StepResult:
    """What a step leaves on the device; nothing here is read back to the host per step."""

    loss_sum: torch.Tensor  # sum of this rank's finite micro-batch losses (float64, 0-dim)


def train_step(engine, objective, model_fn: ModelFn, batches: Iterator[dict[str, Any]],
               loss_by_t: LossByTimestep, seeds: list[int], device: torch.device,
               data_wait=contextlib.nullcontext) -> StepResult:
    """One optimizer step: a micro-batch of forward and backward per seed (``grad_accum`` of
    them); DeepSpeed applies (or, on non-finite gradients, skips) the update at the last.

    No value is read back to the host here: the loss is summed on the device (a ``float()``
    per micro-batch would wait for the GPU to drain its queue before the next micro-batch is
    launched), and whether a step was skipped is what DeepSpeed itself decided."""
    result = StepResult(torch.zeros((), dtype=torch.float64, device=device))
    for seed in seeds:
        with data_wait():
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in next(batches).items()}
        generator = torch.Generator(device=device).manual_seed(seed)
        per_sample, logs = objective(model_fn, batch, generator)
        loss = per_sample.float().mean()
        finite = torch.isfinite(loss.detach())
        result.loss_sum += torch.where(finite, loss.detach(), 0.0).double()
        loss_by_t.add(logs["timesteps"], per_sample.float(), where=finite)
        engine.backward(loss)
        engine.step()
    return result


def run_training(cfg, run_dir: str | Path) -> TrainOutcome:
    """Train (or resume) a run in ``run_dir``; this process's rank comes from its environment.

    Every process of the job calls this (the local launcher, torchrun or SLURM start them).
    Returns "completed" at train.max_steps, or "preempted" after SIGUSR1/SIGTERM made it
    save a checkpoint. Raises NonFiniteTrainingError after too many skipped steps.
    """
    env = dist_env_from_environ()
    # Handlers first: a SIGTERM during the (slow) start-up must not kill the process; the
    # flag is honoured at the first step boundary.
    with PreemptionFlag() as preempt, _heartbeat(cfg, Path(run_dir), env), (
            run_lock(run_dir) if env.rank == 0 else contextlib.nullcontext()):
        device = init_distributed(cfg.train, env)
        try:
            return Trainer(cfg, Path(run_dir), env.rank, env.world_size, device, preempt).fit()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def slurm_heartbeat_dir(run_dir: str | Path) -> Path:
    """Where the ranks of this SLURM job start beat: one directory per job and restart, so a
    requeued run never judges the files its predecessor left behind."""
    start = f"{os.environ.get('SLURM_JOB_ID', '0')}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    return heartbeat_dir(run_dir) / start


def _heartbeat(cfg, run_dir: Path, env) -> Heartbeat | contextlib.nullcontext:
    """Beat into the directory the launcher named (ours, local or SLURM); under srun without
    it (slurm/train.sbatch) into the job's own, which rank 0 watches (see
    scaletrain.core.heartbeat)."""
    directory = os.environ.get(HEARTBEAT_DIR_ENV)
    if not directory and env.source == "slurm":
        directory = str(slurm_heartbeat_dir(run_dir))
    if not directory:
        return contextlib.nullcontext()
    return Heartbeat(directory, env.rank, env.world_size, cfg.train.dist_timeout_s)


class Trainer:
    """One training process: ``__init__`` builds and restores everything, ``fit`` trains."""

    def __init__(self, cfg, run_dir: Path, rank: int, world_size: int, device: torch.device,
                 preempt: PreemptionFlag) -> None:
        self.cfg, self.run_dir, self.device, self.preempt = cfg, run_dir, device, preempt
        self.rank, self.world = rank, world_size
        train = cfg.train
        self.global_batch = cfg.data.batch_size * train.grad_accum * world_size
        # Checked before anything is built or written: released weights that do not fit stop
        # the run in seconds (None when there is no model.init_from or the run resumes).
        init_source = open_init_source(cfg.model, run_dir, cfg.checkpoint.resume)
        reference_batch = lr_batch(cfg, run_dir, world_size)
        # The learning rates of this job (train.scale_lr_with_batch may scale them).
        self.lr_cfg = train_config_in_use(cfg, world_size, reference_batch)
        if rank == 0:
            change = describe_world_change(cfg, run_dir, world_size, self.lr_cfg.lr,
                                           reference_batch)
            if change is not None:
                log.warning("%s", change)
            save_config(cfg, run_dir)
        self.engine = build_engine(train, cfg.model, cfg.data.batch_size, world_size, cfg.seed,
                                   device)
        self.model_fn = cast_inputs(make_model_fn(self.engine, cfg.model.arch),
                                    torch.bfloat16 if train.bf16 else torch.float32)
        self.ema = None
        if cfg.ema.enabled:
            self.ema = ShardedEMA(cfg.ema, master_weight_fragments(
                self.engine.module.named_parameters(), rank, world_size))
        self.loader = build_train_loader(cfg.data, rank, world_size, cfg.seed,
                                         holdout_shards=cfg.eval.holdout_shards)
        # The empty prompt's encoding is the "null" conditioning of CFG dropout.
        self.objective = build_objective(cfg.diffusion, null_cond=self.loader.empty_conditioning())
        self.state = TrainState(lr_batch=reference_batch)
        self.checkpoints = CheckpointManager(
            cfg.checkpoint, run_dir, rank=rank, world_size=world_size,
            zero_stage=train.zero_stage, engine=self.engine, train_state=self.state,
            per_rank=self._per_rank_state(), run_info=self._run_info,
            config_yaml=dump_yaml(cfg), wait_timeout_s=train.dist_timeout_s)
        resumed = self.checkpoints.restore()
        self._start_weights(init_source, resumed)
        self.metrics = MetricsLogger(cfg.logging, run_dir, rank, to_dict(cfg),
                                     resume_step=self.state.step if resumed is not None else None)
        forward = _forward_flops(cfg.model)
        self.throughput = Throughput(
            forward, world_size, device, cfg.logging.peak_tflops,
            hardware_flops_per_sample=training_flops(cfg.model, forward)[
                "hardware_flops_per_sample"])
        self.throughput.load_state_dict({"skipped_steps": self.state.skipped_steps})
        self.loss_by_t = LossByTimestep(cfg.logging.loss_buckets)
        self.diagnostics = DiagnosticsSchedule(cfg.logging.diagnostics_every)
        # Loss of the applied steps since the last log, summed on the device; read back (and
        # reduced over ranks) only at logging steps.
        self.loss_window = torch.zeros((), dtype=torch.float64, device=device)
        self.window_peak = torch.zeros((), dtype=torch.float64, device=device)  # spike check
        self.applied_in_window = 0
        # Preemption is agreed on every step over a CPU (gloo) group: a flag exchange that
        # never waits for the GPU (with NCCL, a reduction would).
        self.flag_group = _cpu_group()
        self.consecutive_skips = 0
        self.last_skipped = False
        # Mean losses of the last logging windows, for the loss-spike check.
        self.recent_losses: collections.deque[float] = collections.deque(maxlen=20)
        self.spiked = False  # a loss spike since the last checkpoint
        self.fragments = master_weight_fragments(self.engine.module.named_parameters(),
                                                 rank, world_size)
        self.bar = tqdm(total=train.max_steps, initial=self.state.step, desc="train", unit="step",
                        dynamic_ncols=True, disable=not (train.progress_bar and rank == 0))
        self.validator = None
        if cfg.validation.every > 0 and cfg.data.synthetic.enabled:
            log.warning("validation.every is ignored with data.synthetic (nothing to decode)")
        elif cfg.validation.every > 0:
            info = self.loader.info
            self.validator = Validator(cfg, run_dir, device=device, rank=rank,
                                       metrics_logger=self.metrics,
                                       latent_scaling=(info.scaling_factor, info.shift_factor))
        self.evaluation = self._evaluation() if cfg.eval.every > 0 else None
        self.batches: Iterator[dict[str, Any]] | None = None  # iter(self.loader), at step 1

    def _evaluation(self) -> TrainingEvaluation | None:
        if self.cfg.data.synthetic.enabled:
            log.warning("eval.every is ignored with data.synthetic (no held-out set, no encoders)")
            return None
        info = self.loader.info
        setting = EvalSetting.from_root(self.cfg, (info.scaling_factor, info.shift_factor))
        evaluator = Evaluator(self.cfg.eval, setting, device=self.device,
                              stats_path=eval_dir(self.run_dir) / "fid_reference.npz")
        return TrainingEvaluation(evaluator, self.engine, self.ema, self.model_fn, self.metrics,
                                  self.throughput)

    def _start_weights(self, source, resumed: Path | None) -> None:
        """A new run starts from model.init_from (if set); the record of what it read goes
        into config.yaml, and into every checkpoint's copy of it."""
        self.cfg.model.init_record = start_weights(
            source, self.cfg.model, run_dir=self.run_dir, engine=self.engine, ema=self.ema,
            state=self.state, resumed=resumed, rank=self.rank)
        self.checkpoints.config_yaml = dump_yaml(self.cfg)
        if self.rank == 0:
            save_config(self.cfg, self.run_dir)

    def _per_rank_state(self) -> dict[str, PerRank]:
        states = {"data": loader_state(self.loader), "rng": RNG}
        if self.ema is not None:
            states["ema"] = PerRank(self.ema.state_dict, self.ema.load_state_dict,
                                    self.ema.load_shards)
        return states

    def _run_info(self) -> dict[str, Any]:
        return {"global_batch": self.global_batch,
                "ema_updates": self.ema.updates if self.ema is not None else 0}

    def fit(self) -> TrainOutcome:
        train, state = self.cfg.train, self.state
        log.info("training: world %d, ZeRO-%d, bf16=%s, global batch %d, steps %d -> %d",
                 self.world, train.zero_stage, train.bf16, self.global_batch, state.step,
                 train.max_steps)
        first_step, first_samples, started = state.step, state.samples_seen, time.perf_counter()
        status: Literal["completed", "preempted"] = "completed"
        if self.batches is None:  # started here, so the first step's time holds no set-up
            self.batches = iter(self.loader)
        self.throughput.start()
        finished = False
        try:
            while state.step < train.max_steps:
                if self.step():
                    status = "preempted"
                    break
            # An asynchronous save may still be writing: the job ends (or is requeued)
            # only after its COMPLETE marker.
            self.checkpoints.wait()
            finished = True
            if status == "preempted":
                log.warning("preempted: checkpoint saved at step %d", state.step)
        finally:
            if not finished:  # an exception: no collectives, the other ranks may be gone
                self.checkpoints.finish_local()
            self.bar.close()
            self.metrics.close()
            self.loader.close()  # stop DataLoader workers now, not at interpreter exit
        last_grid = sorted((self.run_dir / "validation").glob("step_*.png"))
        return TrainOutcome(status, state.step, state.samples_seen,
                            steps_run=state.step - first_step,
                            samples_run=state.samples_seen - first_samples,
                            seconds=time.perf_counter() - started,
                            skipped_steps=state.skipped_steps,
                            last_grid=str(last_grid[-1]) if last_grid else None)

    def step(self) -> bool:
        """One optimizer step and everything around it (LR, EMA, metrics, validation, eval,
        checkpoint); returns whether to stop for a preemption (its checkpoint is saved)."""
        train, state = self.cfg.train, self.state
        lr = lr_at(self.lr_cfg, state.step)
        set_lr(self.engine, lr)
        collect = self.diagnostics.should_collect(state.step + 1)
        set_model_diagnostics(self.engine.module, collect)
        seeds = [step_seed(self.cfg.seed, self.rank, state.samples_seen, micro)
                 for micro in range(train.grad_accum)]
        if self.batches is None:
            self.batches = iter(self.loader)
        result = train_step(self.engine, self.objective, self.model_fn, self.batches,
                            self.loss_by_t, seeds, self.device,
                            self.throughput.waiting_for_data)
        preempted = self._finish_step(result)
        if self.ema is not None and not self.last_skipped:
            self.ema.update(state.samples_seen, self.global_batch)
        diagnostics = pop_model_diagnostics(self.engine.module) if collect else {}
        last = state.step == train.max_steps
        if state.step % self.cfg.logging.every == 0 or last or collect:
            self._log(lr, diagnostics_metrics(diagnostics))
        if self.validator is not None and self.validator.should_run(state.step):
            self._validate()
        if self.evaluation is not None:
            self.evaluation.maybe_run(state.step, state.samples_seen)
        stop = preempted and not last  # preempted at the very end: just finish
        if state.step % self.cfg.checkpoint.every == 0 or last or stop:
            if self.applied_in_window:  # a spike since the last log counts too
                self._read_loss_window(reset=False)
            wrecked = self._weights_wrecked()
            healthy = wrecked is None and not self.spiked
            self.checkpoints.save(healthy=healthy)
            self.spiked = False
            if wrecked is not None:
                raise NonFiniteTrainingError(
                    f"step {state.step}: {wrecked} (train.max_weight_norm="
                    f"{train.max_weight_norm:g}): an update wrecked the weights; "
                    f"stopping. {kept_checkpoint_note(self.run_dir)}")
        return stop

    def _finish_step(self, result: StepResult) -> bool:
        """Whether the step was skipped, whether to stop for preemption; count the step.
        Returns whether a preemption was requested on any rank."""
        # A NaN loss on any rank makes the reduced gradients NaN everywhere, so DeepSpeed
        # skips the update on all ranks (bf16 check_grad_overflow, or ZeRO's overflow check):
        # its decision, which it already reduced over the ranks, is the one skip signal.
        self.last_skipped = step_was_skipped(self.engine)
        preempted = _any_rank(self.preempt.is_set, self.flag_group)
        self.state.step += 1
        self.state.samples_seen += self.global_batch
        self.throughput.step_done(self.global_batch, skipped=self.last_skipped)
        self.bar.update(1)
        if self.last_skipped:
            self.consecutive_skips += 1
            self._skipped(self.consecutive_skips)
        else:
            self.consecutive_skips = 0
            self.loss_window += result.loss_sum
            torch.maximum(self.window_peak,
                          result.loss_sum.to(torch.float64) / self.cfg.train.grad_accum,
                          out=self.window_peak)
            self.applied_in_window += 1
        return preempted

    def _read_loss_window(self, reset: bool = True) -> float:
        """Collective: the mean loss of the applied steps since the last read (NaN if none),
        read back from the device here only (logging steps, or a checkpoint between them),
        and the loss-spike check on the window's highest step loss."""
        total = _all_reduce_sum([self.loss_window], self.device)[0]
        peak = self.window_peak.clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        applied = self.applied_in_window
        mean = (total / (applied * self.world * self.cfg.train.grad_accum) if applied
                else float("nan"))
        if applied:
            self._check_spike(mean, float(peak), keep=reset)
        if reset:
            self.applied_in_window = 0
            self.loss_window.zero_()
            self.window_peak.zero_()
        return mean

    def _check_spike(self, mean: float, peak: float, keep: bool) -> None:
        """A step loss above train.loss_spike_factor x the running median of the windows'
        mean losses marks the next checkpoint unhealthy. The peak is each rank's own step
        loss (a per-step reduction would sync the host every step); the median is of
        global means, identical on every rank, so every rank decides the same."""
        factor = self.cfg.train.loss_spike_factor
        if factor > 0 and len(self.recent_losses) >= 5:
            median = float(np.median(self.recent_losses))
            if peak > factor * median:
                if not self.spiked:
                    log.warning("step %d: loss %.4g is over %g x its running median %.4g; "
                                "the next checkpoint is marked unhealthy", self.state.step,
                                peak, factor, median)
                self.spiked = True
        if keep:
            self.recent_losses.append(mean)

    def _weights_wrecked(self) -> str | None:
        """Collective: the global L2 norms of the fp32 weights and of the EMA (each rank
        sums the squares of its own slices); a reason if either is non-finite or above
        train.max_weight_norm, else None."""
        sq = [sum(float(f.source().detach().float().pow(2).sum()) for f in self.fragments),
              sum(float(t.pow(2).sum()) for t in self.ema.shadow) if self.ema is not None
              else 0.0]
        weights, ema = (math.sqrt(v) if math.isfinite(v) else math.inf
                        for v in _all_reduce_sum(sq, self.device))
        bound = self.cfg.train.max_weight_norm
        for what, norm in (("weight", weights), ("EMA", ema)):
            if not math.isfinite(norm) or norm > bound:
                return f"{what} norm {norm:.4g}"
        return None

    def _skipped(self, in_a_row: int) -> None:
        self.state.skipped_steps += 1
        log.warning("step %d skipped: non-finite loss or gradient norm (%d in a row)",
                    self.state.step, in_a_row)
        limit = self.cfg.train.max_consecutive_skips
        if in_a_row >= limit:
            raise NonFiniteTrainingError(
                f"{in_a_row} consecutive steps had a non-finite loss or gradient norm "
                f"(train.max_consecutive_skips={limit}); stopping at step {self.state.step}. "
                + kept_checkpoint_note(self.run_dir))

    def _log(self, lr: float, extra: dict[str, float]) -> None:
        """Collective (every rank calls it at the same steps); rank 0 writes."""
        self.loss_by_t.all_reduce()
        grad_norm = self.engine.get_global_grad_norm()
        loss = self._read_loss_window()
        if math.isfinite(loss):
            self.bar.set_postfix(loss=f"{loss:.4f}")
        metrics = {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "skipped_steps": self.state.skipped_steps,
            **self.throughput.summary(),
            **self.loss_by_t.summary(),
            **extra,
        }
        if self.ema is not None:
            metrics["ema_updates"] = self.ema.updates
        metrics.update({f"data/{k}": v for k, v in
                        _loader_metrics_over_ranks(self.loader.metrics(), self.device).items()})
        self.metrics.log(self.state.step, metrics, samples_seen=self.state.samples_seen)
        if self.rank == 0:
            progress.info("%s", progress_line(self.state.step, self.cfg.train.max_steps, metrics))

    def _validate(self) -> None:
        """Sample the validation prompts from the EMA weights (collective on every rank)."""
        module = self.engine.module
        set_model_diagnostics(module, False)
        module.eval()
        try:
            with torch.no_grad(), (self.ema.swapped_into(module) if self.ema is not None
                                   else contextlib.nullcontext()):
                self.validator.run(self.state.step, self.model_fn)
        finally:
            module.train()


def _all_reduce_sum(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _loader_metrics_over_ranks(local: dict[str, object], device: torch.device
                               ) -> dict[str, float]:
    """The loader's counters summed over ranks (collectives at logging steps only, never per
    step): each rank counts what it lost or skipped itself, and rank 0's alone would hide
    rank 1's losses. Epochs are the lowest over ranks (the one still in progress somewhere).
    Every rank's loader reports the same keys (one config)."""
    numbers = {k: float(v) for k, v in sorted(local.items()) if isinstance(v, (int, float))}
    if not numbers or not (dist.is_available() and dist.is_initialized()) \
            or dist.get_world_size() == 1:  # generated data counts nothing
        return numbers
    keys = list(numbers)
    is_epoch = [k == "epoch" or k.endswith("/epoch") for k in keys]
    sums = _all_reduce_sum([0.0 if e else numbers[k] for k, e in zip(keys, is_epoch)], device)
    out = {k: v for k, v, e in zip(keys, sums, is_epoch) if not e}
    epochs = [k for k, e in zip(keys, is_epoch) if e]
    if epochs:
        t = torch.tensor([numbers[k] for k in epochs], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        out.update(zip(epochs, t.tolist()))
    return out


def _cpu_group():
    """A gloo group of all ranks for host-side flags (None: the default group is gloo)."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def _any_rank(flag: bool, group) -> bool:
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _forward_flops(model_cfg) -> float:
    """Forward FLOPs per sample for TFLOP/s and MFU (0 when they cannot be counted: metrics
    only, never a reason to fail a run)."""
    try:
        return float(model_info(model_cfg, with_backward=False)["flops_per_sample"])
    except Exception:  # noqa: BLE001
        log.warning("could not count the model's FLOPs; TFLOP/s and MFU are not logged")
        return 0.0
