"""Evaluation during training: the Trainer's hook around :class:`scaletrain.eval.Evaluator`.

Every ``eval.every`` steps, on every rank (ZeRO-3 gathers are collective, and every rank
takes its share of the samples): the validation loss of the raw weights, then, with the EMA
weights swapped in (:meth:`ShardedEMA.swapped_into`), the validation loss, FID and CLIP
score of the EMA. Rank 0 logs them under ``eval/`` to metrics.jsonl and wandb:

    eval/loss, eval/loss_t/{t}         EMA weights (the raw weights when EMA is off)
    eval/loss_raw, eval/loss_raw_t/{t} raw weights (when EMA is on)
    eval/fid, eval/clip_score          samples of the EMA weights
    eval/seconds, eval/time_fraction   this evaluation's wall time; all evaluations' share of
                                       the job's wall time since its first step

Evaluation time is left out of the throughput window, so perf/* stays a training figure.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch

from scaletrain.eval import Evaluator
from scaletrain.train.monitor.diagnostics import set_model_diagnostics

log = logging.getLogger(__name__)


class TrainingEvaluation:
    """``maybe_run(step, samples_seen)`` after each step; collective, every rank calls it."""

    def __init__(self, evaluator: Evaluator, engine, ema, model_fn, metrics_logger,
                 throughput) -> None:
        self.evaluator, self.engine, self.ema = evaluator, engine, ema
        self.model_fn, self.metrics, self.throughput = model_fn, metrics_logger, throughput
        self.seconds = 0.0
        self._clock: float | None = None
        evaluator.prepare()

    def maybe_run(self, step: int, samples_seen: int) -> dict[str, Any] | None:
        if self._clock is None:
            self._clock = time.perf_counter()
        if not self.evaluator.should_run(step):
            return None
        start = time.perf_counter()
        with self.throughput.paused():
            metrics = self._evaluate()
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        metrics["eval/seconds"] = elapsed
        metrics["eval/time_fraction"] = self.seconds / max(time.perf_counter() - self._clock,
                                                           1e-9)
        log.info("evaluation at step %d (%.1f s): %s", step, elapsed, ", ".join(
            f"{k.removeprefix('eval/')}={v:.4g}" for k, v in metrics.items()
            if k.count("/") == 1 and isinstance(v, float)))
        self.metrics.log(step, metrics, samples_seen=samples_seen)
        return metrics

    def _evaluate(self) -> dict[str, Any]:
        module, evaluator = self.engine.module, self.evaluator
        wants_loss = "loss" in evaluator.cfg.metrics
        out: dict[str, Any] = {}
        set_model_diagnostics(module, False)
        module.eval()
        try:
            with torch.no_grad():
                if wants_loss and self.ema is not None:
                    out.update(_prefixed(evaluator.loss(self.model_fn), "loss", "loss_raw"))
                swap = (self.ema.swapped_into(module) if self.ema is not None
                        else contextlib.nullcontext())
                with swap:
                    if wants_loss:
                        out.update(_prefixed(evaluator.loss(self.model_fn), "loss", "loss"))
                    samples = evaluator.sample_metrics(self.model_fn)
        finally:
            module.train()
        out.update({f"eval/{k}": v for k, v in samples.items() if not isinstance(v, list)})
        return out


def _prefixed(result: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """``loss``/``loss_t/...`` -> ``eval/{new}``/``eval/{new}_t/...``."""
    return {f"eval/{new}{k[len(old):]}" if k.startswith(old) else f"eval/{k}": v
            for k, v in result.items()}
