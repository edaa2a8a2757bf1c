"""`scaletrain sample --weights DIR (--prompt TEXT ... | --prompts FILE) [--steps N] [--cfg S]
[--seed N ...] --out DIR [--sampler NAME] [--negative-prompt TEXT]`.

Loads an export (either layout) and the image and text encoders it records, and writes one
PNG per prompt and seed, ``samples.jsonl`` and ``grid.png`` (see :mod:`.pipeline`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from scaletrain.config import load_config
from scaletrain.core.log import setup_logging
from scaletrain.export.layout import ExportError
from scaletrain.sample.pipeline import GRID_NAME, RECORDS_NAME, read_prompts, sample_images

log = logging.getLogger(__name__)

SAMPLERS = ("ddim", "euler", "dpm2", "heun")
DTYPES = ("fp32", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, metavar="DIR",
                        help="an export directory written by `scaletrain export`")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="a prompt (repeat for several)")
    prompts.add_argument("--prompts", metavar="FILE",
                         help="a text file with one prompt per line ('#' comments)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the run's diffusion.sample_steps)")
    parser.add_argument("--cfg", type=float, default=None,
                        help="classifier-free guidance scale, 1 = off "
                             "(default: the run's diffusion.guidance_scale)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="one or more seeds: one image per prompt and seed (default 0)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help="default: the run's diffusion.sampler (ddim for eps/v/x0, euler "
                             "for flow)")
    parser.add_argument("--negative-prompt", default=None, metavar="TEXT",
                        help="guide away from this prompt instead of the unconditional")
    parser.add_argument("--height", type=int, default=None,
                        help="image height in pixels (default: the training resolution)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width in pixels (default: the training resolution)")
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM / Euler-ancestral noise (default: the run's diffusion.eta)")
    parser.add_argument("--guidance-rescale", type=float, default=None,
                        help="CFG rescale phi (Lin et al. 2024; default: the run's)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="dtype the model runs in (default fp32)")
    parser.add_argument("--encoders", default=None, metavar="YAML",
                        help="a config whose preprocess section names the image/text encoders "
                             "(default: the ones recorded in the export)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def main(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, rank=0)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # New images next to stale ones (or over some of them) would read as one set.
        print(f"scaletrain sample: error: --out {out} already holds files (earlier samples?); "
              f"give a new folder", file=sys.stderr)
        return 1
    try:
        prompts = args.prompt if args.prompt else read_prompts(args.prompts)
        preprocess = None
        if args.encoders:
            preprocess = load_config(args.encoders).preprocess
        records = sample_images(
            args.weights,
            prompts,
            steps=args.steps,
            cfg_scale=args.cfg,
            seed=args.seed,
            out_dir=args.out,
            sampler=args.sampler,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            eta=args.eta,
            guidance_rescale=args.guidance_rescale,
            batch_size=args.batch_size,
            device=args.device,
            dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
            preprocess=preprocess,
        )
    except (ExportError, ValueError, OSError) as exc:
        print(f"scaletrain sample: error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(records)} images in {args.out}")
    print(f"  {args.out}/{RECORDS_NAME}")
    print(f"  {args.out}/{GRID_NAME}")
    return 0
