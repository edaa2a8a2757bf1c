"""`scaletrain eval` in two forms:

    scaletrain eval RUN_OR_EXPORT CONFIG [--step N] [--out DIR] [--nproc N] [KEY=VALUE ...]
    scaletrain eval fid REAL FAKE [--inception PATH] [--batch-size N] [--dims D] [--json]

The first evaluates an export (``scaletrain export``'s output) or a checkpoint of a run (a
run directory: the newest complete checkpoint, or ``--step N``; or a ``step_*`` directory)
with the ``eval`` section of CONFIG (plus ``data.path`` for ``eval.holdout_shards``): the
held-out validation loss, FID and CLIP score, as training computes them. The model, its
diffusion settings and its encoders come with the weights. It writes ``eval.json`` (metric
values, sample counts, the weights' step, the settings) to ``--out``, by default
``RUN_DIR/eval/step_N/`` for a checkpoint and ``EXPORT_eval/`` beside an export.

The second prints the FID between two image folders, shard patterns or ``.npz`` statistics,
as pytorch-fid computes it; ``--json`` prints a JSON record instead, ``--out DIR`` also
writes it to ``DIR/eval.json``.

With ``--nproc N`` this process starts N local ranks running the same command; under
torchrun or SLURM each process is one rank. The ranks share the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from scaletrain.cli.common import resolve_config
from scaletrain.core.dist_env import (
    EXIT_FAILED,
    EXIT_OK,
    dist_env_from_environ,
    set_default_pg_timeout,
)
from scaletrain.core.files import atomic_write
from scaletrain.core.log import setup_logging
from scaletrain.eval.config import FID_DIMS
from scaletrain.eval.offline import RESULT_NAME, evaluate_weights, fid_between, json_ready
from scaletrain.export.layout import ExportError
from scaletrain.launch.local import launch_local
from scaletrain.train.config import TrainConfig

log = logging.getLogger(__name__)

USAGE = ("scaletrain eval RUN_OR_EXPORT CONFIG [--step N] [--out DIR] [--nproc N] "
         "[KEY=VALUE ...]\n       scaletrain eval fid REAL FAKE [--inception PATH] "
         "[--batch-size N] [--dims D] [--json] [--out DIR]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = USAGE
    parser.description = ("Held-out validation loss, FID and CLIP score of an export or a "
                          "checkpoint (written to eval.json); or the FID of two image sets.")
    parser.add_argument("positional", nargs="+", metavar="ARG",
                        help="RUN_OR_EXPORT CONFIG [KEY=VALUE ...], or: fid REAL FAKE")
    parser.add_argument("--step", type=int, default=None,
                        help="evaluate this step's checkpoint instead of the newest")
    parser.add_argument("--out", default=None,
                        help="directory for eval.json (default: RUN_DIR/eval/step_N, or "
                             "EXPORT_eval beside an export; fid: none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing eval.json in --out")
    parser.add_argument("--nproc", type=int, default=None,
                        help="start N local processes that share the work")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="dtype the model runs in (default fp32)")
    parser.add_argument("--inception", default=None, metavar="PATH",
                        help="fid: pytorch-fid's Inception weights file (default: pytorch-fid's "
                             "URL through the torch hub cache)")
    parser.add_argument("--batch-size", type=int, default=50,
                        help="fid: images per Inception call (default 50)")
    parser.add_argument("--dims", type=int, choices=FID_DIMS, default=2048,
                        help="fid: Inception feature width (2048, the standard FID)")
    parser.add_argument("--json", action="store_true",
                        help="fid: print a JSON record instead of the bare number")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def main(args: argparse.Namespace) -> int:
    fid = args.positional[0] == "fid"
    if fid and len(args.positional) != 3:
        print("scaletrain eval fid: error: needs REAL and FAKE (image folders, shard patterns "
              "or .npz statistics)", file=sys.stderr)
        return 2
    if not fid and len(args.positional) < 2:
        print(f"usage: {USAGE}\nscaletrain eval: error: needs RUN_OR_EXPORT and CONFIG",
              file=sys.stderr)
        return 2
    if not fid:
        args.config, args.overrides = args.positional[1], args.positional[2:]
        cfg = resolve_config(args)  # validates eagerly, also in the launcher process
        if cfg is None:
            return EXIT_OK
    if args.nproc is not None:
        return launch_local(_rank_argv(args), args.nproc)

    env = dist_env_from_environ()
    setup_logging(args.log_level, rank=env.rank)
    timeout_s = cfg.train.dist_timeout_s if not fid else TrainConfig().dist_timeout_s
    device = _join(env, timeout_s) if env.world_size > 1 else _device(args.device)
    try:
        if fid:
            return _fid(args, device, env.rank)
        result = evaluate_weights(
            args.positional[0], cfg.eval, step=args.step, out_dir=args.out, device=device,
            dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
            overwrite=args.overwrite, data_path=cfg.data.path)
    except (ExportError, ValueError, OSError) as exc:
        if env.rank == 0:
            print(f"scaletrain eval: error: {exc}", file=sys.stderr)
        log.debug("evaluation failed", exc_info=True)
        return EXIT_FAILED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if env.rank == 0:
        step = result["weights"].get("step")
        print(f"evaluated {result['weights']['kind']} weights of step {step}:")
        for key, value in result["metrics"].items():
            print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {value}")
        print(f"  {result['path']}")
    return EXIT_OK


def _rank_argv(args: argparse.Namespace) -> list[str]:
    """This command without --nproc: what each local rank runs."""
    argv = ["eval", *args.positional, "--device", args.device, "--dtype", args.dtype,
            "--batch-size", str(args.batch_size), "--dims", str(args.dims),
            "--log-level", args.log_level]
    for flag, value in (("--step", args.step), ("--out", args.out),
                        ("--inception", args.inception)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [flag for flag, on in (("--overwrite", args.overwrite), ("--json", args.json)) if on]
    return argv


def _join(env, timeout_s: float) -> torch.device:
    """Join the ranks' process group (env:// rendezvous; NCCL on GPUs, gloo on CPUs). No
    DeepSpeed here: evaluation runs plain modules, and importing it costs seconds."""
    os.environ.update(env.as_torch_env())
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank,
                            world_size=env.world_size, timeout=set_default_pg_timeout(timeout_s))
    return device


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fid(args: argparse.Namespace, device: torch.device, rank: int) -> int:
    _, real, fake = args.positional
    result = json_ready(fid_between(real, fake, inception=args.inception, dims=args.dims,
                                    batch_size=args.batch_size, device=device))
    if rank != 0:
        return EXIT_OK
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        path = Path(args.out) / RESULT_NAME
        if path.exists() and not args.overwrite:
            raise FileExistsError(f"{path}: exists; pass --overwrite or another --out")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    print(text if args.json else f"{result['fid']:.6f}", end="" if args.json else "\n")
    return EXIT_OK
