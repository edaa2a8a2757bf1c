"""Preprocessing throughput on this machine: full pipeline vs the decode-only ceiling.

Writes synthetic raw shards (scaletrain/data/synthetic.py), then measures samples/s for

* decode only: read the tar, decode, RGB, bucket, resize and crop (the DataLoader side of
  the pipeline, no encoders): the ceiling image decoding sets on this CPU;
* the full pipeline (``preprocess_shards``) with tiny encoders: the demo preset (pixel
  space-to-depth + tiny CLIP), and a tiny SDXL-layout AutoencoderKL + tiny CLIP-L/OpenCLIP
  pair through the ``sdxl`` text preset.

Each figure is the best of ``--repeats`` runs (the machine may be shared). Results go to
docs/benchmarks.md (section "preprocess").

    PYTHONPATH=. python benchmarks/bench_preprocess.py [--shards 4 --samples 256 --size 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.report import machine_description, publish

ROOT = Path(__file__).resolve().parent.parent


def decode_only_rate(cfg, pattern: str, workers: int) -> float:
    from scaletrain.data.preprocess.samples import Prepared, RawShardDataset, worker_init
    from scaletrain.data.preprocess.work import expand_inputs, shard_table

    table = shard_table(expand_inputs(pattern))
    loader = DataLoader(
        RawShardDataset(table, cfg),
        batch_size=None,
        num_workers=workers,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )
    start = time.perf_counter()
    count = sum(isinstance(msg, Prepared) for msg in loader)
    return count / (time.perf_counter() - start)


def full_rate(cfg, pattern: str, scratch: Path) -> tuple[float, float]:
    """(samples/s of the whole run, of which seconds loading encoders)."""
    from scaletrain.data.encoders import build_image_encoder, build_text_encoder
    from scaletrain.data.preprocess.pipeline import preprocess_shards

    t0 = time.perf_counter()
    build_image_encoder(cfg), build_text_encoder(cfg)
    load = time.perf_counter() - t0
    out = scratch / f"out-{time.monotonic_ns()}"
    start = time.perf_counter()
    summary = preprocess_shards(cfg, pattern, out)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return summary.samples_written / seconds, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=256, help="samples per shard")
    parser.add_argument("--size", type=int, default=64, help="side of the synthetic images")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, do not update docs")
    args = parser.parse_args(argv)

    from scaletrain.config import load_config
    from scaletrain.data.encoders.common import quiet_hub_libraries
    from scaletrain.data.encoders.tiny import save_tiny_clip, save_tiny_open_clip, save_tiny_vae
    from scaletrain.data.preprocess.config import (
        ClipGConfig,
        ClipLConfig,
        ImageEncoderConfig,
        TextEncoderConfig,
    )
    from scaletrain.data.synthetic import CAPTION_WORDS, write_synthetic_shards

    quiet_hub_libraries()
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="bench_preprocess-"))
    try:
        pattern = write_synthetic_shards(scratch / "raw", args.shards, args.samples, args.size)
        total = args.shards * args.samples
        demo = load_config(
            ROOT / "configs" / "data" / "demo.yaml",
            [
                f"preprocess.text_encoder.tiny.cache_dir={scratch / 'cache'}",
                "preprocess.progress=false",
                f"preprocess.resolution={args.size}",
            ],
        ).preprocess
        vae_dir = save_tiny_vae(scratch / "vae", block_out_channels=(32, 64, 64, 64))
        clip_dir = save_tiny_clip(scratch / "clip", CAPTION_WORDS, hidden_size=64)
        oc = save_tiny_open_clip(scratch / "open_clip", width=64)
        sdxl_tiny = replace(
            demo,
            image_encoder=ImageEncoderConfig(kind="vae", name=str(vae_dir), dtype="bf16"),
            text_encoder=TextEncoderConfig(
                preset="sdxl",
                clip_l=ClipLConfig(name=str(clip_dir)),
                clip_g=ClipGConfig(name="local-dir:" + oc["local_dir"]),
                dtype="bf16",
            ),
        )
        rows = []

        def best(fn):
            return max(fn() for _ in range(args.repeats))

        for workers in (0, 1, 2):
            cfg = replace(demo, decode_workers=workers)
            rows.append(
                (
                    "decode only (tar, PIL decode, RGB, bucket, crop)",
                    workers,
                    best(lambda c=cfg, w=workers: decode_only_rate(c, pattern, w)),
                    None,
                )
            )
        for name, base in (
            ("demo preset: pixel + tiny CLIP", demo),
            ("tiny SDXL-layout VAE (8x) + tiny CLIP-L/OpenCLIP (sdxl preset)", sdxl_tiny),
        ):
            for workers in (0, 1):
                cfg = replace(base, decode_workers=workers)
                results = [full_rate(cfg, pattern, scratch) for _ in range(args.repeats)]
                rate, load = max(results)
                rows.append((name, workers, rate, load))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    command = "PYTHONPATH=. python benchmarks/bench_preprocess.py " + " ".join(
        f"--{k} {v}"
        for k, v in (
            ("shards", args.shards),
            ("samples", args.samples),
            ("size", args.size),
            ("repeats", args.repeats),
        )
    )
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## Preprocessing (raw shards -> latent shards)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine_description()}; load average {load_avg:.1f} when the run ended "
        "(the cores are shared with other jobs, so figures are lower bounds). "
        f"{total} synthetic {args.size}x{args.size} JPEGs in {args.shards} shards; "
        "1 torch thread; best of "
        f"{args.repeats} runs. Decode workers are DataLoader processes (0: in the main "
        "process); the main process runs the encoders.",
        "",
        "| pipeline | decode workers | samples/s | encoder load (s) |",
        "| --- | --- | --- | --- |",
    ]
    for name, workers, rate, load in rows:
        load_text = "" if load is None else f"{load:.2f}"
        lines.append(f"| {name} | {workers} | {rate:.0f} | {load_text} |")
    lines += [
        "",
        "Full-pipeline figures include reading, decoding, encoding, writing the tar and the "
        "manifest, and rebuilding the index; they are per run of `preprocess_shards` "
        "(the encoders are built inside it).",
        "",
        "SDXL VAE (`stabilityai/sdxl-vae`) encode at 1024x1024 in bf16, images/s on a GPU: "
        "**not measured** (no GPU was lent to this task).",
    ]
    text = "\n".join(lines)
    publish("preprocess", text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
