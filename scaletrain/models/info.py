"""``scaletrain model-info CONFIG [KEY=VALUE ...] [--json]``: parameters and FLOPs of a model.

The model is built on the meta device and one forward (and backward) is traced there with
``torch.utils.flop_counter.FlopCounterMode``, so no memory is allocated: an 8B config can be
inspected on a laptop. FLOPs are per sample at the configured ``model.sample_size`` and
``model.text_seq_len`` (a multiply-add counts 2; attention via SDPA is counted).
The config may be a full run config or a model preset (a file with a ``model:`` section).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from scaletrain.cli import add_config_arguments, resolve_config
from scaletrain.config_base import to_dict
from scaletrain.models import build_model, count_parameters
from scaletrain.models.config import MMDiTConfig, UNetConfig
from scaletrain.models.inputs import example_inputs


def model_info(cfg: UNetConfig | MMDiTConfig, with_backward: bool = True) -> dict:
    """{"arch", "params", "flops_per_sample", ["train_flops_per_sample"], ...} on meta."""
    model = build_model(cfg, device="meta")
    inputs = example_inputs(cfg, batch_size=1, device="meta")
    with FlopCounterMode(display=False) as forward_counter:
        out = model(**inputs)
    info = {
        "arch": cfg.arch,
        "params": count_parameters(model),
        "flops_per_sample": float(forward_counter.get_total_flops()),
        "sample_size": cfg.sample_size,
        "text_seq_len": cfg.text_seq_len,
    }
    if with_backward:
        with FlopCounterMode(display=False) as backward_counter:
            out.float().sum().backward()
        info["train_flops_per_sample"] = info["flops_per_sample"] + float(
            backward_counter.get_total_flops()
        )
    return info


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
        f"resolution:           {info['sample_size']}x{info['sample_size']} latents, "
        f"{info['text_seq_len']} text tokens",
        f"forward FLOPs/sample: {info['flops_per_sample'] / 1e12:.3f} TFLOP",
    ]
    if "train_flops_per_sample" in info:
        lines.append(f"fwd+bwd FLOPs/sample: {info['train_flops_per_sample'] / 1e12:.3f} TFLOP")
    lines.append("config: " + json.dumps(to_dict(cfg.model)))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
