"""Framework overhead: a full scaletrain training step against a bare PyTorch loop.

    PYTHONPATH=. python benchmarks/bench_step.py [--rounds 7] [--steps 10] [--no-write]

Writes the "step" section of docs/benchmarks.md.

* ``scaletrain``: ``Trainer.step()`` on one rank (gloo), exactly what ``scaletrain train``
  runs per step: the loader over latent shards on local disk (``data.num_workers=0``, so its
  time is on the step's critical path), the objective (timesteps, noise, CFG dropout, the
  latent draw), the DeepSpeed ZeRO-2 engine (client AdamW, gradient clipping), the sharded
  EMA, the loss-by-timestep and the metrics (a log line every ``logging.every`` steps, as the
  preset sets it).
* ``bare``: the same model (same config and seed), batch shapes and AdamW (same
  hyper-parameters, ``clip_grad_norm_`` at the same norm), no DeepSpeed, no EMA, no metrics;
  its batches sit in memory and its loss is the rectified-flow loss written inline.

Both in fp32 with one intra-op thread. Rounds alternate which side goes first; the figure
is the median over rounds of the paired ratio (scaletrain / bare of the same round), since
the machine is shared and its load drifts. The scaletrain side is instrumented to say where
its extra time goes: waiting for the loader, the EMA update, the logging steps, and the rest
(objective, engine, bookkeeping) minus the bare step.

The models: the demo preset (configs/train/demo.yaml: tiny U-Net, 32x32x12 latents, batch 8)
and the same preset with the tiny MMDiT (configs/models/tiny_mmdit.yaml) as its model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_loader import write_shards  # noqa: E402
from benchmarks.report import git_revision, machine_description, publish  # noqa: E402
from scaletrain.config import RootConfig  # noqa: E402
from scaletrain.core.config_base import apply_overrides, from_dict, load_yaml  # noqa: E402
from scaletrain.core.dist_env import dist_env_from_environ  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.train.engine import build_optimizer, init_distributed  # noqa: E402
from scaletrain.train.loop import Trainer  # noqa: E402
from scaletrain.train.signals import PreemptionFlag  # noqa: E402

DEMO = REPO / "configs" / "train" / "demo.yaml"
TINY_MMDIT = REPO / "configs" / "models" / "tiny_mmdit.yaml"
LATENT_SIDE = 32  # the demo's latents: 64x64 pixels, space-to-depth by 2


def bench_config(model: str, shards: Path) -> RootConfig:
    data = load_yaml(DEMO)
    if model == "mmdit":
        data["model"] = load_yaml(TINY_MMDIT)["model"]
    data = apply_overrides(data, [
        f"data.path={shards}", "data.num_workers=0", "train.bf16=false",
        "train.max_steps=1000000000", "checkpoint.every=1000000000", "checkpoint.resume=false",
        "train.progress_bar=false", "logging.wandb_mode=disabled",
    ])
    return from_dict(RootConfig, data)


class TimedIterator:
    """Wraps the trainer's batch iterator: seconds spent in next() (the loader)."""

    def __init__(self, it):
        self.it, self.seconds = it, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - start


def timed_method(obj, name: str, totals: dict[str, float], key: str) -> None:
    """Replace obj.name with a wrapper adding its seconds to totals[key]."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    setattr(obj, name, wrapper)


class BareLoop:
    """The same model, batch shapes and optimizer in plain PyTorch; batches in memory."""

    def __init__(self, cfg: RootConfig, batch: dict):
        torch.manual_seed(cfg.seed)
        self.cfg, self.arch = cfg, cfg.model.arch
        self.model = build_model(cfg.model).train()
        self.opt = build_optimizer(cfg.train, self.model.parameters(), fused=False)
        self.batch = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
        self.generator = torch.Generator().manual_seed(1)
        self.opt_seconds = 0.0  # clipping and the AdamW step

    def forward(self, xt, t):
        b = self.batch
        if self.arch == "unet":
            return self.model(xt, t * 1000, b["encoder_hidden_states"],
                              added_cond_kwargs={"text_embeds": b["pooled"],
                                                 "time_ids": b["time_ids"]})
        return self.model(xt, b["encoder_hidden_states"], b["pooled"], t * 1000)

    def step(self) -> None:
        x0 = self.batch["latents_mean"]
        noise = torch.randn(x0.shape, generator=self.generator)
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=self.generator))  # logit-normal
        tt = t.view(-1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * noise
        loss = F.mse_loss(self.forward(xt, t).float(), noise - x0)  # rectified flow
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.opt_seconds += time.perf_counter() - start


def bench(model: str, shards: Path, tmp: Path, rounds: int, steps: int, warmup: int) -> dict:
    run_dir = tmp / f"run_{model}"
    run_dir.mkdir()
    cfg = bench_config(model, shards)
    device = init_distributed(cfg.train, dist_env_from_environ())
    with PreemptionFlag() as preempt:
        trainer = Trainer(cfg, run_dir, 0, 1, device, preempt)
        timed = TimedIterator(iter(trainer.loader))
        trainer.batches = timed
        totals = {"ema": 0.0, "log": 0.0, "engine_step": 0.0, "engine_backward": 0.0}
        timed_method(trainer.engine, "step", totals, "engine_step")
        timed_method(trainer.engine, "backward", totals, "engine_backward")
        if trainer.ema is not None:
            timed_method(trainer.ema, "update", totals, "ema")
        timed_method(trainer, "_log", totals, "log")
        bare = BareLoop(cfg, next(timed))  # one loader (a second iter() would replace it)
        trainer.throughput.start()
        for _ in range(warmup):
            trainer.step()
            bare.step()
        per_round = []
        for r in range(rounds):
            before = {"data": timed.seconds, "bare_opt": bare.opt_seconds, **totals}
            times = {}
            for side in (("scaletrain", "bare") if r % 2 == 0 else ("bare", "scaletrain")):
                start = time.perf_counter()
                for _ in range(steps):
                    trainer.step() if side == "scaletrain" else bare.step()
                times[side] = (time.perf_counter() - start) / steps
            parts = {"data": timed.seconds - before["data"],
                     "bare_opt": bare.opt_seconds - before["bare_opt"],
                     **{k: totals[k] - before[k] for k in totals}}
            per_round.append({**times, "ratio": times["scaletrain"] / times["bare"],
                              **{k: v / steps for k, v in parts.items()}})
        trainer.loader.close()
        trainer.metrics.close()
    # The process group stays for the next model (DeepSpeed caches its groups).
    med = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    params = sum(p.numel() for p in bare.model.parameters())
    return {"model": model, "params": params, "batch": cfg.data.batch_size,
            "rounds": per_round, "median": med}


def render(results: list[dict], args, machine: str) -> str:
    lines = [
        "## Framework overhead per training step (benchmarks/bench_step.py)",
        "",
        f"Command: `PYTHONPATH=. python benchmarks/bench_step.py --rounds {args.rounds} "
        f"--steps {args.steps}` (git {git_revision()})",
        "",
        f"Machine: {machine}; one intra-op thread, fp32, one rank (gloo), loader in the "
        "training process (data.num_workers=0). A full `Trainer.step()` (loader, objective, "
        "DeepSpeed ZeRO-2 engine, EMA, metrics) against a bare PyTorch loop on the same model, "
        "batch shapes and AdamW with the batch in memory; see the script's docstring. "
        f"{args.rounds} interleaved rounds of {args.steps} steps each; medians over rounds; "
        "the ratio is the median of each round's paired ratio (target <= 1.10).",
        "",
        "| model | params | batch | scaletrain ms/step | bare ms/step | ratio (paired) | "
        "loader ms | EMA ms | logging ms | optimizer step ms: DeepSpeed / bare | "
        "DeepSpeed backward ms | rest ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for res in results:
        m = res["median"]
        rest = (m["scaletrain"] - m["bare"] - m["data"] - m["ema"] - m["log"]
                - (m["engine_step"] - m["bare_opt"]))
        name = "demo U-Net (tiny_unet)" if res["model"] == "unet" else "tiny MMDiT"
        lines.append(
            f"| {name} | {res['params'] / 1e6:.2f}M | {res['batch']} | "
            f"{1e3 * m['scaletrain']:.1f} | {1e3 * m['bare']:.1f} | **{m['ratio']:.3f}** | "
            f"{1e3 * m['data']:.2f} | {1e3 * m['ema']:.2f} | {1e3 * m['log']:.2f} | "
            f"{1e3 * m['engine_step']:.1f} / {1e3 * m['bare_opt']:.1f} | "
            f"{1e3 * m['engine_backward']:.1f} | {1e3 * rest:.1f} |")
    lines += [
        "",
        "Columns after the ratio split the extra time of a scaletrain step (ms per step, "
        "medians): waiting for the loader's next batch, the EMA update, the logging steps "
        "(one in `logging.every`, averaged over all steps: the device-to-host read-back, "
        "the reductions and the metrics writer), DeepSpeed's optimizer step (ZeRO-2 gradient "
        "norm over its flat partitions, clipping, AdamW on the fp32 partition, copy back) next "
        "to the bare `clip_grad_norm_` + `AdamW.step`, DeepSpeed's backward (autograd plus its "
        "per-parameter gradient hooks that copy each gradient into the reduction bucket, and "
        "the bucket's all-reduce, even on one rank), and the rest: scaletrain's step minus the "
        "bare step, the loader, EMA, logging columns and the optimizer-step difference "
        "(forward and backward through DeepSpeed's engine, the objective, bookkeeping).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["unet", "mmdit"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = tmp / "shards"  # the demo's data: 64x64 px, 12 x 32 x 32 latents, 64-dim text
        write_shards(shards, 128, 4, 2 * LATENT_SIDE, channels=12, factor=2, text_dim=64,
                     pooled_dim=64)
        for model in args.models:
            res = bench(model, shards, tmp, args.rounds, args.steps, args.warmup)
            m = res["median"]
            print(f"{model}: scaletrain {1e3 * m['scaletrain']:.1f} ms, bare "
                  f"{1e3 * m['bare']:.1f} ms, ratio {m['ratio']:.3f}; loader "
                  f"{1e3 * m['data']:.2f} ms, EMA {1e3 * m['ema']:.2f} ms, logging "
                  f"{1e3 * m['log']:.2f} ms", flush=True)
            results.append(res)
    text = render(results, args, machine_description())
    publish("step", text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
