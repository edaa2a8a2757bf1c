"""`scaletrain plot RUN_DIR [--out DIR]`: PNG plots of a run's metrics.jsonl (no wandb needed).

Writes loss, loss per timestep bucket, throughput and stability diagnostics into a fresh
folder (default ``RUN_DIR/plots/YYYYmmdd-HHMMSS``); an existing folder with files is refused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None,
                        help="folder for the PNGs (default RUN_DIR/plots/<timestamp>)")


def main(args: argparse.Namespace) -> int:
    from scaletrain.train.monitor.plots import write_plots  # matplotlib only for this command

    out = Path(args.out) if args.out else (
        Path(args.run_dir) / "plots" / time.strftime("%Y%m%d-%H%M%S"))
    try:
        files = write_plots(args.run_dir, out)
    except (OSError, ValueError) as exc:
        print(f"scaletrain plot: error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(files)} plots in {out}")
    for path in files:
        print(f"  {path}")
    return 0
