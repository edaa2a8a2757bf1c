"""``scaletrain model-info CONFIG [KEY=VALUE ...] [--json]``: parameters and FLOPs of a model.

Built on the meta device (no memory), so an 8B config can be inspected on a laptop. The config
may be a full run config or a model preset (a file with a ``model:`` section).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from scaletrain.cli.common import add_config_arguments, resolve_config
from scaletrain.core.config_base import to_dict
from scaletrain.models.info import format_flops, model_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--no-backward",
        action="store_true",
        help="count the forward only (skips train_flops_per_sample; faster for huge models)",
    )


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if cfg is None:  # --dry-run printed the config
        return 0
    torch.manual_seed(0)
    info = model_info(cfg.model, with_backward=not args.no_backward)
    if args.json:
        sys.stdout.write(json.dumps(info) + "\n")
        return 0
    lines = [
        f"arch:                 {info['arch']}",
        f"parameters:           {info['params']:,} ({info['params'] / 1e9:.3f} B)",
        f"trainable:            {info['trainable_params']:,} "
        f"({100 * info['trainable_params'] / max(info['params'], 1):.1f}%)",
        f"resolution:           {info['sample_size']}x{info['sample_size']} latents, "
        f"{info['text_seq_len']} text tokens",
        f"forward FLOPs/sample: {format_flops(info['flops_per_sample'])}",
        f"model FLOPs/sample:   {format_flops(info['model_flops_per_sample'])} "
        "(3 x forward; MFU counts these)",
        f"hardware FLOPs/sample: {format_flops(info['hardware_flops_per_sample'])} "
        "(+ checkpoint recompute; HFU counts these)",
    ]
    if "train_flops_per_sample" in info:
        lines.append(f"traced fwd+bwd FLOPs/sample: {format_flops(info['train_flops_per_sample'])}")
    lines.append("config: " + json.dumps(to_dict(cfg.model)))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
