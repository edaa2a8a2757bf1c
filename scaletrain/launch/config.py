"""SLURM submission config (issue 8). Command-line flags of `scaletrain submit` override it.

The section describes *where and how big* a job is; what it trains is the rest of the root
config. Every field maps onto one sbatch option (named in its comment), so a cluster's
conventions can live in a preset (``slurm: {partition: gpu, account: proj}``) and the flags
only say what changes per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scaletrain.core.config_base import require


@dataclass
class SlurmConfig:
    # --nodes
    nodes: int = 1
    # --gpus-per-node. 0 runs on CPUs (gloo) and then tasks_per_node says how many tasks.
    gpus_per_node: int = 8
    # --ntasks-per-node. 0 means one task per GPU (the only sensible value on GPU nodes).
    tasks_per_node: int = 0
    # --cpus-per-task; 0 derives it for training: data.num_workers + 1 (one core per loader
    # worker and one for the training process).
    cpus_per_task: int = 0
    # --partition ("" leaves it out: the cluster's default partition).
    partition: str = ""
    # --account ("" leaves it out).
    account: str = ""
    # --qos ("" leaves it out).
    qos: str = ""
    # --constraint, node features such as "h100" ("" leaves it out).
    constraint: str = ""
    # --time in minutes. The job checkpoints and requeues itself before this runs out.
    time_min: int = 240
    # --mem in sbatch syntax ("64G", "500000M"; "0" asks for all of each node's memory);
    # "" leaves the SLURM default.
    mem: str = ""
    # --exclusive: no other job shares the nodes.
    exclusive: bool = False
    # --job-name
    job_name: str = "scaletrain"
    # SLURM sends SIGUSR1 this many seconds before the time limit (--signal=USR1@N); the
    # trainer then saves at the next step boundary and the job requeues itself. It must
    # cover one training step plus one checkpoint save. A save writes ~18 bytes a parameter
    # (bf16 weights, fp32 master, Adam moments, EMA) at about the disk's sequential speed
    # (benchmarks/bench_checkpoint.py): the 8B MMDiT's 145 GB take ~145 s at 1 GB/s, SDXL's
    # 46 GB ~46 s; 300 s covers the 8B model down to ~0.6 GB/s, SDXL down to ~0.2 GB/s.
    signal_delay_s: int = 300
    # Aggregate checkpoint write speed of the run directory's file system in MB/s, used only
    # to warn at submit time when signal_delay_s is shorter than one checkpoint save
    # (model + optimizer + EMA bytes / this). A checkpoint save runs at about the speed of a
    # sequential `dd ... conv=fdatasync` to the run directory (measured, docs/benchmarks.md),
    # so measure yours that way (all nodes writing at once); 1000 is a modest parallel file
    # system.
    checkpoint_write_mb_s: float = 1000.0
    # A job requeues itself at most this many times (SLURM_RESTART_COUNT), so a run that
    # cannot make progress does not loop forever.
    max_requeues: int = 100
    # Shell lines run in the batch script before srun, e.g. ["module load cuda/12.4",
    # "source /path/venv/bin/activate"].
    setup: list[str] = field(default_factory=list)
    # Network interface the ranks talk over, exported as GLOO_SOCKET_IFNAME and
    # NCCL_SOCKET_IFNAME in the batch script ("" leaves both to the library's choice). Set
    # it when the host name resolves to an address other nodes cannot reach (e.g. "ib0",
    # "eth0"); ask your site which interface carries inter-node traffic.
    socket_ifname: str = ""
    # Extra srun options, e.g. ["--cpu-bind=none"].
    srun_args: list[str] = field(default_factory=list)
    # GPUs for each preprocessing array task (one process per task, encoders on one GPU).
    preprocess_gpus: int = 1
    # At most this many preprocessing array tasks run at once (--array=0-K%N); 0: no limit.
    array_parallelism: int = 0

    def __post_init__(self) -> None:
        require(self.nodes > 0, "nodes", f"must be > 0, got {self.nodes}")
        require(self.gpus_per_node >= 0, "gpus_per_node", "must be >= 0")
        require(self.tasks_per_node >= 0, "tasks_per_node", "must be >= 0 (0: one per GPU)")
        require(
            self.tasks_per_node == 0
            or self.gpus_per_node == 0
            or self.tasks_per_node == self.gpus_per_node,
            "tasks_per_node",
            f"must equal gpus_per_node ({self.gpus_per_node}) on GPU nodes: one task per GPU "
            f"(got {self.tasks_per_node}); use 0 to derive it",
        )
        require(self.checkpoint_write_mb_s > 0, "checkpoint_write_mb_s",
                f"must be > 0 MB/s, got {self.checkpoint_write_mb_s}")
        require(self.cpus_per_task >= 0, "cpus_per_task", "must be >= 0 (0: SLURM default)")
        require(self.time_min > 0, "time_min", f"must be > 0, got {self.time_min}")
        require(
            0 <= self.signal_delay_s < self.time_min * 60,
            "signal_delay_s",
            f"must be in [0, time_min*60 = {self.time_min * 60}), got {self.signal_delay_s}",
        )
        require(self.max_requeues >= 0, "max_requeues", "must be >= 0")
        require(bool(self.job_name.strip()), "job_name", "must not be empty")
        require(
            self.mem == "" or _valid_mem(self.mem),
            "mem",
            f"must look like 64G, 500M, 2T or 0 (sbatch --mem syntax), got {self.mem!r}",
        )
        require(self.preprocess_gpus >= 0, "preprocess_gpus", "must be >= 0")
        require(self.array_parallelism >= 0, "array_parallelism", "must be >= 0 (0: no limit)")

    @property
    def tasks_per_node_resolved(self) -> int:
        """Tasks (processes) on each node: one per GPU, or tasks_per_node (>= 1) on CPUs."""
        if self.gpus_per_node > 0:
            return self.gpus_per_node
        return max(self.tasks_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node_resolved


def _valid_mem(text: str) -> bool:
    text = text.strip().upper()
    if text and text[-1] in "KMGT":
        text = text[:-1]
    return text.isdigit()
