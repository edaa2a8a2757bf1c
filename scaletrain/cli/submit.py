"""`scaletrain submit`: send training (or preprocessing) to SLURM through submitit.

Training::

    scaletrain submit CONFIG --run-dir DIR --nodes 4 --gpus-per-node 8 \\
        [--partition P --account A --qos Q --time 2-00:00:00 --constraint C --mem 0 \\
         --exclusive --cpus-per-task 12 --job-name NAME] [KEY=VALUE ...] [--dry-run]

Preprocessing as a job array (one task per array index, then one job that writes the
dataset index once every task has succeeded)::

    scaletrain submit CONFIG --preprocess --input 'raw/*.tar' --output latents/ \\
        --array-size 64 [--gpus-per-node 1 ...]

Flags are shorthands for keys of the ``slurm`` config section (``--nodes 4`` is
``slurm.nodes=4``) and win over the YAML and the KEY=VALUE overrides, so ``--dry-run``
shows exactly what would be submitted. The submission itself is
:mod:`scaletrain.launch.submit`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from scaletrain.cli.common import add_config_arguments
from scaletrain.config import load_config
from scaletrain.core.config_base import dump_yaml
from scaletrain.launch.records import slurm_dir
from scaletrain.launch.submit import (
    PREEMPT_SIGNAL,
    Submission,
    SubmitError,
    checkpoint_warning,
    job_parameters,
    preprocess_parameters,
    resolve_inputs,
    sbatch_preview,
    submit_preprocessing,
    submit_training,
)

# command-line flag -> key of the slurm config section
_FLAG_KEYS = {
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "tasks_per_node": "tasks_per_node",
    "cpus_per_task": "cpus_per_task",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "time": "time_min",
    "mem": "mem",
    "exclusive": "exclusive",
    "job_name": "job_name",
    "signal_delay": "signal_delay_s",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    for action in parser._actions:
        if action.dest == "dry_run":
            action.help = ("print the SLURM parameters, the batch script and the resolved "
                           "config; submit nothing")
    parser.description = (parser.description or "") + (
        ". Flags override the `slurm` config section; --dry-run prints the SLURM parameters "
        "and the resolved config without submitting."
    )
    parser.add_argument("--run-dir", help="training run directory (checkpoints, logs, job "
                        "records); submitting again for the same directory resumes it")
    res = parser.add_argument_group("resources (override slurm.* keys)")
    res.add_argument("--nodes", type=int, help="nodes (slurm.nodes)")
    res.add_argument("--gpus-per-node", type=int,
                     help="GPUs per node, one task each; 0 for CPU-only nodes (with "
                     "--preprocess: GPUs per array task, slurm.preprocess_gpus)")
    res.add_argument("--tasks-per-node", type=int,
                     help="tasks per node on CPU-only nodes (with --gpus-per-node 0)")
    res.add_argument("--cpus-per-task", type=int, help="CPU cores per task")
    res.add_argument("--partition", help="SLURM partition")
    res.add_argument("--account", help="SLURM account")
    res.add_argument("--qos", help="SLURM quality of service")
    res.add_argument("--time", type=parse_slurm_time, metavar="TIME",
                     help="time limit: minutes, or [D-]HH:MM[:SS] as sbatch reads it")
    res.add_argument("--constraint", help="node features (sbatch --constraint)")
    res.add_argument("--mem", help="memory per node, sbatch syntax: 64G, 500M, 0 (= all)")
    res.add_argument("--exclusive", action="store_true", default=None,
                     help="do not share nodes with other jobs")
    res.add_argument("--job-name", help="SLURM job name")
    res.add_argument("--signal-delay", type=int, metavar="SECONDS",
                     help="SIGUSR1 this long before the time limit: checkpoint and requeue")
    pre = parser.add_argument_group("preprocessing job array")
    pre.add_argument("--preprocess", action="store_true",
                     help="submit preprocessing as a job array instead of training")
    pre.add_argument("--input", action="append", metavar="PATTERN",
                     help="raw shards: glob, brace pattern 'raw/{00000..00099}.tar' or "
                     "'::' list (may repeat)")
    pre.add_argument("--output", metavar="DIR", help="where the latent shards go")
    pre.add_argument("--array-size", type=int, metavar="K",
                     help="array tasks sharing the shards (at most one per shard)")


def parse_slurm_time(text: str) -> int:
    """sbatch --time formats -> whole minutes (rounded up): 90, 1:30:00, 2-00:00:00, 2-12."""
    text = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"time {text!r}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        )
    days, a, b, c = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:  # minutes
        seconds = int(a) * 60
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"time {text!r}: must be positive")
    return math.ceil(seconds / 60)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The resource flags as ``slurm.KEY=VALUE`` overrides (strings JSON-quoted)."""
    out = []
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if args.preprocess and flag == "gpus_per_node":
            key = "preprocess_gpus"  # one process per array task
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)  # YAML reads a JSON string as a string: mem "0" stays "0"
        else:
            text = str(value)
        out.append(f"slurm.{key}={text}")
    return out



def _print_plan(mode: str, params: dict[str, Any], folder: Path, cfg: Any, extra: str,
                array_size: int | None = None) -> None:
    shown = {k: v for k, v in params.items() if k != "additional_parameters"}
    shown.update(params.get("additional_parameters", {}))
    out = sys.stdout
    out.write(f"# scaletrain submit --dry-run: {mode}; nothing was submitted\n")
    if extra:
        out.write(extra)
    out.write("# SLURM parameters\n")
    out.write(yaml.safe_dump({"slurm_parameters": shown}, sort_keys=True))
    out.write("# batch script submitit would write\n")
    out.write("".join(f"#   {line}\n" for line in sbatch_preview(params, folder, array_size).splitlines()))
    out.write("# resolved config\n")
    out.write(dump_yaml(cfg))


def _describe(sub: Submission, cfg: Any) -> str:
    s = cfg.slurm
    code = sub.code
    rev = code.get("git_rev")
    rev_text = f"git {rev[:12]}{' + uncommitted changes' if code.get('git_dirty') else ''}" \
        if rev else "not a git checkout"
    stdout_pattern = str(sub.stdout).replace(f"{sub.job_id}_0_", f"{sub.job_id}_<rank>_")
    lines = [
        f"submitted job {sub.job_id}: {s.nodes} node(s) x {s.tasks_per_node_resolved} task(s) "
        f"= {sub.world_size} rank(s), {s.gpus_per_node} GPU(s)/node, {s.time_min} min",
        f"  run dir : {sub.run_dir}",
        f"  logs    : {sub.stdout}",
        f"            {sub.stderr}",
        f"            (rank r: {stdout_pattern}; job events: {slurm_dir(sub.run_dir)}/jobs.jsonl)",
        f"  config  : {sub.config_path}",
        f"  code    : {code['tarball']} ({rev_text})",
    ]
    w = sub.wandb
    if w.get("mode") == "disabled":
        lines.append("  wandb   : disabled")
    else:
        lines.append(f"  wandb   : run {w['name']!r} in project {w['project']!r} ({w['mode']}), "
                     f"dir {w['dir']}")
    lines += [
        f"  watch   : squeue -j {sub.job_id}; sacct -D -j {sub.job_id}",
        f"  stop    : scancel {sub.job_id}   (checkpoint + requeue now: "
        f"scancel --signal={PREEMPT_SIGNAL} {sub.job_id})",
    ]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + flag_overrides(args)
    cfg = load_config(args.config, overrides)
    try:
        if args.preprocess:
            return _main_preprocess(args, cfg)
        return _main_train(args, cfg)
    except SubmitError as exc:
        print(f"scaletrain submit: {exc}", file=sys.stderr)
        return 2


def _main_train(args: argparse.Namespace, cfg: Any) -> int:
    for flag in ("input", "output", "array_size"):
        if getattr(args, flag) is not None:
            raise SubmitError(f"--{flag.replace('_', '-')} is for --preprocess only")
    if not args.run_dir:
        raise SubmitError("--run-dir is required: where checkpoints, logs and records go")
    run_dir = Path(args.run_dir).resolve()
    # What every task runs, as a command a person could type (the job itself calls the same
    # function through submitit with the resolved config).
    command = shlex.join(["scaletrain", "train", str(args.config), "--run-dir", str(run_dir),
                          *args.overrides, *flag_overrides(args)])
    warning = checkpoint_warning(cfg)
    if warning:
        print(warning, file=sys.stderr)
    if args.dry_run:
        extra = f"# run dir: {run_dir} (resumes from its latest checkpoint if any)\n"
        _print_plan("training", job_parameters(cfg, command), slurm_dir(run_dir) / "%j",
                    cfg, extra)
        return 0
    sub = submit_training(cfg, run_dir, command=command)
    sys.stdout.write(_describe(sub, cfg))
    return 0


def _main_preprocess(args: argparse.Namespace, cfg: Any) -> int:
    missing = [f for f in ("input", "output", "array_size") if getattr(args, f) is None]
    if missing:
        raise SubmitError("--preprocess needs " + ", ".join(
            "--" + f.replace("_", "-") for f in missing))
    if args.array_size < 1:
        raise SubmitError(f"--array-size must be >= 1, got {args.array_size}")
    inputs = resolve_inputs(args.input)
    output = Path(args.output).resolve()
    records_dir = Path(args.run_dir).resolve() if args.run_dir else output
    log_dir = slurm_dir(records_dir)
    array_size = min(args.array_size, len(inputs))
    if args.dry_run:
        extra = (f"# {len(inputs)} input shard(s) -> {output}; array of {array_size} task(s) "
                 f"(each takes its share of the shards), then one index job\n")
        _print_plan("preprocessing array", preprocess_parameters(cfg.slurm, array_size),
                    log_dir / "%j", cfg, extra, array_size)
        return 0
    sub = submit_preprocessing(cfg, inputs, output, array_size, records_dir)
    sys.stdout.write(
        f"submitted preprocessing array {sub.job_id} ({array_size} tasks over {len(inputs)} "
        f"shards) and index job {sub.extra_job_ids[0]} (runs after all tasks succeed)\n"
        f"  output : {output}\n"
        f"  logs   : {log_dir}/<job>/  (task 0: {sub.stdout})\n"
        f"  config : {sub.config_path}\n"
        f"  watch  : squeue -j {sub.job_id},{sub.extra_job_ids[0]}; resubmit the same command "
        f"to redo only what is missing\n"
    )
    return 0
