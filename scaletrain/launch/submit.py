"""Submitting training (or preprocessing) to SLURM through submitit.

Training runs one task per GPU (``slurm.tasks_per_node`` sets the count on CPU-only nodes,
with ``gpus_per_node: 0``). Each task finds its rank, world size, local rank and master from
the SLURM environment (:mod:`scaletrain.core.dist_env`) and runs
:func:`scaletrain.train.loop.run_training`; the job checkpoints and requeues itself on
preemption or before its time limit (see :mod:`scaletrain.launch.jobs`). Submitting again
for the same run directory resumes it from its latest checkpoint.

Preprocessing runs as a job array (one task per array index), then one job that writes the
dataset index once every task has succeeded. The command line is :mod:`scaletrain.cli.submit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from scaletrain.core.config_base import save_config
from scaletrain.data.preprocess.work import expand_inputs
from scaletrain.launch.config import SlurmConfig
from scaletrain.launch.jobs import FinalizeIndexJob, PreprocessArrayTask, TrainingJob
from scaletrain.launch.records import append_job_record, read_job_records, slurm_dir, snapshot_code
from scaletrain.launch.slurm_state import live_state
from scaletrain.train.loop import run_training
from scaletrain.train.monitor.metrics_logger import resolve_wandb_mode

PREEMPT_SIGNAL = "USR1"  # what scaletrain.train.signals.PreemptionFlag handles
# Live states in which a second job for the same run directory would fight the first.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING",
                 "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


class SubmitError(RuntimeError):
    """The submission cannot go ahead; the message says why and what to do."""


# --------------------------------------------------------------------------- parameters


def _common_parameters(s: SlurmConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    params: dict[str, Any] = {
        "job_name": s.job_name,
        "time": s.time_min,
        "signal_delay_s": s.signal_delay_s,
        # Shell lines before srun. submitit's own handler must listen to the same signal as
        # the trainer (see scaletrain.launch.jobs).
        "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}", *s.setup],
    }
    if s.socket_ifname:
        params["setup"].append(f"export GLOO_SOCKET_IFNAME={s.socket_ifname} "
                               f"NCCL_SOCKET_IFNAME={s.socket_ifname}")
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


def training_parameters(s: SlurmConfig, loader_workers: int | None = None,
                        dist_timeout_s: float | None = None, command: str = ""
                        ) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for a training job.

    ``loader_workers`` (data.num_workers): with ``slurm.cpus_per_task: 0`` each task asks
    for one core per loader worker plus one for itself, and OMP_NUM_THREADS gives the
    training process the cores the workers leave. ``dist_timeout_s`` and ``command`` are
    shown in the script (and echoed into the job log) so the job says what it runs.
    """
    if loader_workers is not None and not s.cpus_per_task:
        s = dataclasses.replace(s, cpus_per_task=loader_workers + 1)
    params, additional = _common_parameters(s)
    setup = params["setup"]
    if s.cpus_per_task:
        threads = max(1, s.cpus_per_task - (loader_workers or 0))
        setup.append(f"export OMP_NUM_THREADS={threads}  # cpus-per-task minus loader workers")
    # A failed NCCL collective then raises (and the job ends) instead of hanging.
    setup.append("export TORCH_NCCL_ASYNC_ERROR_HANDLING=1")
    if dist_timeout_s is not None:
        setup.append(f"# collectives fail after train.dist_timeout_s={dist_timeout_s:g} s "
                     "(process-group timeout)")
    setup.append("# network: set slurm.socket_ifname (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME) if "
                 "the host name "
                 "does not resolve to the inter-node network; NCCL_IB_HCA as your site advises")
    if command:
        setup.append(f"echo {shlex.quote('scaletrain: each task runs the equivalent of: ' + command)}")
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


def sbatch_preview(params: dict[str, Any], folder: Path, array_size: int | None = None) -> str:
    """The batch script submitit would write for ``params`` (for --dry-run); with
    ``array_size``, the job array's script (its ``--array=0-K%N`` line)."""
    params = dict(params)
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size, **params)


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
    try:
        executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=max_num_timeout)
    except RuntimeError as exc:  # submitit: 'Could not detect "srun"'
        raise SubmitError(f"{exc} (sbatch/srun must be on PATH)") from exc
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def _sbatch_errors():
    """A job sbatch refused (bad partition, account, time...): SLURM's own words, in at
    most two lines, as a SubmitError; submitit's copy of them on stderr is held back."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except submitit.core.utils.FailedJobError as exc:
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        raise SubmitError("sbatch refused the job: " + " / ".join(lines[:2])) from None
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    sys.stderr.write(held.getvalue())


def _active_job(run_dir: Path) -> tuple[str, str] | None:
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
    """Where the trainer's wandb run will be (the names the metrics logger chooses)."""
    log_cfg = cfg.logging
    return {
        "mode": resolve_wandb_mode(log_cfg),
        "project": log_cfg.wandb_project,
        "name": log_cfg.run_name or run_dir.name,
        "dir": str(run_dir / "wandb"),
    }


def job_parameters(cfg: Any, command: str = "") -> dict[str, Any]:
    """training_parameters for the root config ``cfg``."""
    return training_parameters(cfg.slurm, loader_workers=cfg.data.num_workers,
                               dist_timeout_s=cfg.train.dist_timeout_s, command=command)


def checkpoint_warning(cfg: Any) -> str | None:
    """One line when slurm.signal_delay_s looks too short to save this model's checkpoint.

    Bytes per parameter: bf16 weights 2 (if bf16) + fp32 master 4 + Adam moments 8 + EMA 4
    (if enabled), written at slurm.checkpoint_write_mb_s (aggregate, all ranks together);
    one more minute covers the step in flight and the slack of signal delivery.
    """
    from scaletrain.models.info import model_info

    params = model_info(cfg.model, with_backward=False)["params"]
    per_param = (2 if cfg.train.bf16 else 0) + 4 + 8 + (4 if cfg.ema.enabled else 0)
    size_mb = params * per_param / 1e6
    needed = size_mb / cfg.slurm.checkpoint_write_mb_s + 60
    if cfg.slurm.signal_delay_s >= needed:
        return None
    return (f"warning: slurm.signal_delay_s={cfg.slurm.signal_delay_s} may be too short: a "
            f"checkpoint of this model is ~{size_mb / 1e3:.1f} GB, ~{needed:.0f} s to write at "
            f"slurm.checkpoint_write_mb_s={cfg.slurm.checkpoint_write_mb_s:g} plus one step")


def submit_training(cfg: Any, run_dir: str | Path, entry: Callable = run_training,
                    command: str = "") -> Submission:
    """Submit ``cfg`` to train in ``run_dir`` (resuming what is there) and record it."""
    run_dir = Path(run_dir).resolve()
    active = _active_job(run_dir)
    if active:
        raise SubmitError(
            f"job {active[0]} for {run_dir} is still {active[1]}: two jobs must not train "
            f"into one run directory (scancel {active[0]} first, or wait for it)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    params = job_parameters(cfg, command)
    executor = _executor(slurm_dir(run_dir) / "%j", params, cfg.slurm.max_requeues)
    with _sbatch_errors():
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
    with _sbatch_errors(), executor.batch():
        jobs = [executor.submit(PreprocessArrayTask(), cfg.preprocess, inputs, str(output_dir))
                for _ in range(array_size)]
    array_id = jobs[0].job_id.split("_")[0]
    finalize = _executor(log_dir / "%j", finalize_parameters(cfg.slurm, array_id)).submit(
        FinalizeIndexJob(), str(output_dir)
    )
    job_dir = log_dir / array_id
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


