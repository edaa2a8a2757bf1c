"""`scaletrain export RUN_DIR [--step N] --weights ema|raw --format safetensors|diffusers
--dtype bf16|fp32 --out DIR [--encoders YAML] [--overwrite]`.

Runs on a CPU-only machine with any number of processes: it reads the checkpoint's shards
from disk, whatever world size and ZeRO stage wrote them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from scaletrain.core.log import setup_logging
from scaletrain.export.layout import DTYPES, LAYOUTS, SAFETENSORS, WEIGHT_KINDS, ExportError
from scaletrain.export.writer import export_checkpoint

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="run directory (newest complete checkpoint) or a step_* directory")
    parser.add_argument("--step", type=int, default=None,
                        help="export this step's checkpoint instead of the newest")
    parser.add_argument("--weights", choices=WEIGHT_KINDS, default="ema",
                        help="EMA weights or the raw (optimizer master) weights (default ema)")
    parser.add_argument("--format", dest="layout", choices=LAYOUTS, default=SAFETENSORS,
                        help="safetensors: model.safetensors + config.json; diffusers: the "
                             "layout diffusers' from_pretrained loads (default safetensors)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="dtype of the written weights (default fp32)")
    parser.add_argument("--out", required=True, help="export directory to create")
    parser.add_argument("--encoders", default=None, metavar="YAML",
                        help="a config whose preprocess section names the image/text encoders "
                             "(default: the run's own preprocess section)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it already holds files")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def main(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, rank=0)
    try:
        result = export_checkpoint(
            args.run_dir,
            args.out,
            step=args.step,
            weights=args.weights,
            layout=args.layout,
            dtype=args.dtype,
            encoders=args.encoders,
            overwrite=args.overwrite,
        )
    except ExportError as exc:
        print(f"scaletrain export: error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {result.weights} weights of step {result.step} "
          f"({result.num_params:,} parameters, {result.dtype}, {result.layout} layout)")
    print(f"  from {result.checkpoint}")
    for name in result.files:
        print(f"  {result.out_dir / name}")
    for warning in result.warnings:
        print(f"  warning: {warning}")
    return 0
