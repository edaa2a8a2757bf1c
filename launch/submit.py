"""`scaletrain submit`: send training (or preprocessing) to SLURM through submitit.

Training::

    scaletrain submit CONFIG --run-dir DIR --nodes 4 --gpus-per-node 8 \\
        [--partition P --account A --qos Q --time 2-00:00:00 --constraint C --mem 0 \\
         --exclusive --cpus-per-task 12 --job-name NAME] [KEY=VALUE ...] [--dry-run]

One task per GPU (``--tasks-per-node`` sets the count on CPU-only nodes, with
``--gpus-per-node 0``). Each task finds its rank, world size, local rank and master from the
SLURM environment (launch.env) and runs ``scaletrain.train.run_training``; the job
checkpoints and requeues itself on preemption or before its time limit (see launch.jobs).
Submitting again for the same run directory resumes it from its latest checkpoint.

Preprocessing as a job array (one task per array index, then one job that writes the
dataset index once every task has succeeded)::

    scaletrain submit CONFIG --preprocess --input 'raw/*.tar' --output latents/ \\
        --array-size 64 [--gpus-per-node 1 ...]

Flags are shorthands for keys of the ``slurm`` config section (``--nodes 4`` is
``slurm.nodes=4``) and win over the YAML and the KEY=VALUE overrides, so ``--dry-run``
shows exactly what would be submitted.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.config import SlurmConfig
from launch.jobs import DEFAULT_TRAIN_ENTRY, FinalizeIndexJob, PreprocessArrayTask, TrainingJob
from launch.records import append_job_record, read_job_records, slurm_dir, snapshot_code

PREEMPT_SIGNAL = "USR1"  # what scaletrain.train.signals.PreemptionFlag handles
# Live states in which a second job for the same run directory would fight the first.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING",
                 "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


class SubmitError(RuntimeError):
    """The submission cannot go ahead; the message says why and what to do."""


# --------------------------------------------------------------------------- arguments

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
    from scaletrain.cli import add_config_arguments

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


# --------------------------------------------------------------------------- parameters


def _common_parameters(s: SlurmConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    params: dict[str, Any] = {
        "job_name": s.job_name,
        "time": s.time_min,
        "signal_delay_s": s.signal_delay_s,
        # Shell lines before srun. submitit's own handler must listen to the same signal as
        # the trainer (see launch.jobs).
        "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}", *s.setup],
    }
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(s, name):
            params[name] = getattr(s, name)
    if s.cpus_per_task:
        params["cpus_per_task"] = s.cpus_per_task
    if s.exclusive:
        params["exclusive"] = True
    if s.srun_args:
        params["srun_args"] = list(s.srun_args)
    additional: dict[str, Any] = {
        "signal": f"{PREEMPT_SIGNAL}@{s.signal_delay_s}",
        # Let SLURM requeue the job too (node failure, preemption with PreemptMode=REQUEUE).
        "requeue": True,
    }
    if s.mem:
        additional["mem"] = s.mem
    return params, additional


def training_parameters(s: SlurmConfig) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for a training job."""
    params, additional = _common_parameters(s)
    params["nodes"] = s.nodes
    params["ntasks_per_node"] = s.tasks_per_node_resolved
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    params["additional_parameters"] = additional
    return params


def preprocess_parameters(s: SlurmConfig, array_size: int) -> dict[str, Any]:
    """submitit parameters for the preprocessing array (one process per array task)."""
    params, additional = _common_parameters(s)
    params.update(nodes=1, ntasks_per_node=1)
    if s.preprocess_gpus:
        params["gpus_per_node"] = s.preprocess_gpus
    params["array_parallelism"] = s.array_parallelism or array_size
    params["additional_parameters"] = additional
    return params


def finalize_parameters(s: SlurmConfig, array_job_id: str) -> dict[str, Any]:
    """A small CPU job that waits for every array task to succeed."""
    params, additional = _common_parameters(s)
    params.update(nodes=1, ntasks_per_node=1, time=min(s.time_min, 60),
                  job_name=f"{s.job_name}-index", dependency=f"afterok:{array_job_id}")
    params.pop("cpus_per_task", None)
    params.pop("exclusive", None)
    # If a task fails the dependency can never be met: let SLURM drop this job instead of
    # leaving it pending forever; resubmitting the array submits a new one.
    additional["kill-on-invalid-dep"] = "yes"
    params["additional_parameters"] = additional
    return params


def sbatch_preview(params: dict[str, Any], folder: Path) -> str:
    """The batch script submitit would write for ``params`` (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = dict(params)
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, **params)


# --------------------------------------------------------------------------- submission


@dataclass
class Submission:
    job_id: str
    run_dir: Path
    job_dir: Path
    stdout: Path
    stderr: Path
    config_path: Path
    code: dict[str, Any]
    wandb: dict[str, Any]
    world_size: int
    extra_job_ids: list[str] = field(default_factory=list)


def _executor(folder: Path, params: dict[str, Any], max_num_timeout: int = 3):
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=max_num_timeout)
    except RuntimeError as exc:  # submitit: 'Could not detect "srun"'
        raise SubmitError(f"{exc} (sbatch/srun must be on PATH)") from exc
    executor.update_parameters(**params)
    return executor


def _active_job(run_dir: Path) -> tuple[str, str] | None:
    from launch.slurm_state import live_state

    seen = []
    for record in read_job_records(run_dir):
        if record.get("event") == "submitted" and record.get("job_id"):
            seen.append(str(record["job_id"]))
    for job_id in reversed(seen):
        state = live_state(job_id)
        if state in ACTIVE_STATES:
            return job_id, state
    return None


def wandb_info(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Where the trainer's wandb run will be (names as scaletrain.train.monitor chooses)."""
    log_cfg = cfg.logging
    mode = getattr(log_cfg, "wandb_mode", None)
    if mode is None:
        mode = "offline" if getattr(log_cfg, "wandb", True) else "disabled"
    return {
        "mode": mode,
        "project": getattr(log_cfg, "wandb_project", "scaletrain"),
        "name": getattr(log_cfg, "run_name", None) or run_dir.name,
        "dir": str(run_dir / "wandb"),
    }


def submit_training(cfg: Any, run_dir: str | Path, entry: Any = DEFAULT_TRAIN_ENTRY
                    ) -> Submission:
    """Submit ``cfg`` to train in ``run_dir`` (resuming what is there) and record it."""
    from scaletrain.config import save_config

    run_dir = Path(run_dir).resolve()
    active = _active_job(run_dir)
    if active:
        raise SubmitError(
            f"job {active[0]} for {run_dir} is still {active[1]}: two jobs must not train "
            f"into one run directory (scancel {active[0]} first, or wait for it)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    params = training_parameters(cfg.slurm)
    executor = _executor(slurm_dir(run_dir) / "%j", params, cfg.slurm.max_requeues)
    job = executor.submit(TrainingJob(entry), cfg, str(run_dir))
    job_dir = slurm_dir(run_dir) / job.job_id
    config_path = save_config(cfg, job_dir)
    code = snapshot_code(job_dir)
    append_job_record(
        run_dir, "submitted", job_id=job.job_id, nodes=cfg.slurm.nodes,
        tasks_per_node=cfg.slurm.tasks_per_node_resolved, gpus_per_node=cfg.slurm.gpus_per_node,
        time_min=cfg.slurm.time_min, config=str(config_path), git_rev=code.get("git_rev"),
        git_dirty=code.get("git_dirty"), argv=sys.argv[1:],
    )
    return Submission(
        job_id=job.job_id, run_dir=run_dir, job_dir=job_dir,
        stdout=Path(job.paths.stdout), stderr=Path(job.paths.stderr), config_path=config_path,
        code=code, wandb=wandb_info(cfg, run_dir), world_size=cfg.slurm.world_size,
    )


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Expand --input (globs, brace ranges, ``::`` lists) to the shard list every array task
    shares, with local paths made absolute (tasks may start in another directory)."""
    from data_pipeline.preprocess.work import expand_inputs

    try:
        urls = expand_inputs(list(patterns))
    except (FileNotFoundError, ValueError) as exc:
        raise SubmitError(f"--input: {exc}") from exc
    out = []
    for url in urls:
        is_local = ":" not in url.split("/", 1)[0]  # no scheme such as pipe: or s3:
        out.append(str(Path(url).resolve()) if is_local else url)
    return out


def submit_preprocessing(cfg: Any, inputs: list[str], output_dir: str | Path, array_size: int,
                         records_dir: str | Path | None = None) -> Submission:
    """Submit the preprocessing array over ``inputs`` and the index job that follows it.

    Logs and records go to ``records_dir``/slurm (default: ``output_dir``/slurm).
    """
    output_dir = Path(output_dir).resolve()
    records_dir = Path(records_dir).resolve() if records_dir else output_dir
    log_dir = slurm_dir(records_dir)
    array_size = min(array_size, len(inputs))
    params = preprocess_parameters(cfg.slurm, array_size)
    executor = _executor(log_dir / "%j", params, cfg.slurm.max_requeues)
    with executor.batch():
        jobs = [executor.submit(PreprocessArrayTask(), cfg.preprocess, inputs, str(output_dir))
                for _ in range(array_size)]
    array_id = jobs[0].job_id.split("_")[0]
    finalize = _executor(log_dir / "%j", finalize_parameters(cfg.slurm, array_id)).submit(
        FinalizeIndexJob(), str(output_dir)
    )
    job_dir = log_dir / array_id
    from scaletrain.config import save_config

    config_path = save_config(cfg, job_dir)
    code = snapshot_code(job_dir)
    append_job_record(
        records_dir, "submitted", kind="preprocess",
        job_id=array_id, finalize_job_id=finalize.job_id, array_size=array_size,
        inputs=len(inputs), output=str(output_dir), config=str(config_path),
        git_rev=code.get("git_rev"), argv=sys.argv[1:],
    )
    return Submission(
        job_id=array_id, run_dir=output_dir, job_dir=job_dir,
        stdout=Path(jobs[0].paths.stdout), stderr=Path(jobs[0].paths.stderr),
        config_path=config_path, code=code, wandb={}, world_size=array_size,
        extra_job_ids=[finalize.job_id],
    )


# --------------------------------------------------------------------------- CLI


def _print_plan(mode: str, params: dict[str, Any], folder: Path, cfg: Any, extra: str) -> None:
    import yaml

    from scaletrain.config_base import dump_yaml

    shown = {k: v for k, v in params.items() if k != "additional_parameters"}
    shown.update(params.get("additional_parameters", {}))
    out = sys.stdout
    out.write(f"# scaletrain submit --dry-run: {mode}; nothing was submitted\n")
    if extra:
        out.write(extra)
    out.write("# SLURM parameters\n")
    out.write(yaml.safe_dump({"slurm_parameters": shown}, sort_keys=True))
    out.write("# batch script submitit would write\n")
    out.write("".join(f"#   {line}\n" for line in sbatch_preview(params, folder).splitlines()))
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
    from scaletrain.config import load_config

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
    if args.dry_run:
        extra = f"# run dir: {run_dir} (resumes from its latest checkpoint if any)\n"
        _print_plan("training", training_parameters(cfg.slurm), slurm_dir(run_dir) / "%j", cfg,
                    extra)
        return 0
    sub = submit_training(cfg, run_dir)
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
                    log_dir / "%j", cfg, extra)
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
