"""`scaletrain demo`: the whole pipeline, offline, on a laptop-sized CPU.

1. generate the synthetic dataset (coloured shapes with captions) as raw img2dataset shards;
2. preprocess it into latent shards (pixel space-to-depth + a tiny CLIP text encoder that is
   built and saved locally on first use);
3. train the tiny U-Net with 2 processes under DeepSpeed ZeRO-2 in bf16, with EMA and
   checkpoints (rerunning resumes);
4. export the EMA weights;
5. sample a fixed set of prompts and write RUN_DIR/samples/*.png, samples.jsonl, grid.png;
6. score the samples: the share whose dominant colour matches the prompt's colour.

Each stage calls the same entry point a user would (`scaletrain preprocess`, `scaletrain
train`, the export and sample libraries), so the demo exercises the real system. Every
stage skips work already done, so an interrupted demo can be rerun to finish.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from scaletrain import cli
from scaletrain.core.log import setup_logging
from scaletrain.data.synthetic import (
    COLOURS,
    caption_for,
    score_samples,
    write_synthetic_shards,
)
from scaletrain.export.writer import export_checkpoint
from scaletrain.sample.pipeline import sample_images

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "train" / "demo.yaml"
# Every colour with three shapes: 24 prompts, one image each.
DEMO_SHAPES = ("circle", "square", "triangle")
# A demo is judged to follow its prompts at this share of matching colours.
TARGET_SCORE = 0.9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="demo_run", help="where everything is written")
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="training preset (its preprocess "
        "section encodes the data)"
    )
    parser.add_argument("--shards", type=int, default=4, help="raw synthetic shards")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--nproc", type=int, default=2, help="training processes")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    parser.add_argument("--sample-steps", type=int, default=None, help="sampler steps")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted overrides for training, e.g. train.max_steps=50",
    )


def demo_prompts() -> list[str]:
    return [caption_for(colour, shape) for colour in COLOURS for shape in DEMO_SHAPES]


class _Stage:
    """Times a stage and prints one line when it ends."""

    def __init__(self, number: int, title: str) -> None:
        self.number, self.title = number, title

    def __enter__(self) -> _Stage:
        print(f"[demo {self.number}/6] {self.title} ...", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            print(f"[demo {self.number}/6] done in {time.perf_counter() - self.start:.0f} s",
                  flush=True)


class DemoError(RuntimeError):
    """A stage failed; the message says which and how to look."""


def _run_cli(argv: list[str], stage: str) -> None:
    status = cli.main(argv)
    if status != 0:
        raise DemoError(f"{stage} failed (exit status {status}): scaletrain {' '.join(argv)}")


def bf16_is_emulated(size: int = 256, repeats: int = 5) -> bool:
    """Whether bf16 matmuls are much slower than fp32 ones on this CPU (no AVX512-BF16/AMX:
    PyTorch then converts every element). Measured, since CPU flags do not tell reliably."""
    a = torch.randn(size, size)

    def best(x: torch.Tensor) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a.bfloat16()) > 3 * best(a)


def run_demo(args: argparse.Namespace) -> dict:
    run = Path(args.run_dir).resolve()
    raw, latents, train_dir = run / "raw", run / "latents", run / "train"
    export_dir, samples_dir = run / "export", run / "samples"
    started = time.perf_counter()

    with _Stage(1, f"synthetic dataset: {args.shards} shards x {args.samples_per_shard}"):
        last = raw / f"{args.shards - 1:05d}.tar"
        pattern = f"{raw}/{{00000..{args.shards - 1:05d}}}.tar"
        if not last.exists():
            pattern = write_synthetic_shards(raw, args.shards, args.samples_per_shard, seed=0)

    with _Stage(2, "preprocess (pixel space-to-depth + tiny CLIP text encoder)"):
        _run_cli(["preprocess", args.config, "--input", pattern, "--output", str(latents),
                  "--workers", str(args.workers)], "preprocessing")

    precision = []
    if not torch.cuda.is_available() and bf16_is_emulated():
        print("[demo] this CPU has no native bf16 (it is emulated, ~13x slower than fp32 here): "
              "training in fp32 (train.bf16=false)", flush=True)
        precision = ["train.bf16=false"]
    mode = "fp32" if precision else "bf16"
    with _Stage(3, f"train: {args.nproc} processes, DeepSpeed ZeRO-2, {mode}, EMA"):
        _run_cli(["train", args.config, "--run-dir", str(train_dir), "--nproc",
                  str(args.nproc), f"data.path={latents}", *precision, *args.overrides],
                 "training")

    with _Stage(4, "export the EMA weights"):
        export_checkpoint(train_dir, export_dir, weights="ema", layout="safetensors",
                          dtype="fp32", overwrite=True)

    prompts = demo_prompts()
    with _Stage(5, f"sample {len(prompts)} prompts"):
        records = sample_images(export_dir, prompts, steps=args.sample_steps,
                                cfg_scale=args.cfg, seed=args.seed, out_dir=samples_dir)

    with _Stage(6, "score: does each image's dominant colour match its prompt?"):
        result = score_samples(records, samples_dir)
        summary = {k: result[k] for k in ("score", "matched", "total")}
        (samples_dir / "score.json").write_text(json.dumps(result, indent=1))

    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["samples_dir"] = str(samples_dir)
    return summary


def main(args: argparse.Namespace) -> int:
    setup_logging("WARNING")
    try:
        summary = run_demo(args)
    except DemoError as exc:
        print(f"scaletrain demo: {exc}", file=sys.stderr)
        return 1
    samples = Path(summary["samples_dir"])
    verdict = "meets" if summary["score"] >= TARGET_SCORE else "is BELOW"
    print(
        f"\ncolour score: {summary['matched']}/{summary['total']} = {summary['score']:.0%} "
        f"({verdict} the {TARGET_SCORE:.0%} target), in {summary['seconds']:.0f} s\n"
        f"samples: {samples}/*.png\n"
        f"records: {samples / 'samples.jsonl'}\n"
        f"grid:    {samples / 'grid.png'}\n"
        f"scores:  {samples / 'score.json'}"
    )
    return 0
