"""Per-rank memory of ZeRO stages 0-3 with 2 ranks, measured in DeepSpeed, next to the formula.

Mixed-precision Adam holds, per parameter (ZeRO paper, Rajbhandari et al. 2020, §3.1):
2 bytes of bf16 weights, 2 of bf16 gradients and 12 of fp32 optimizer state (master weights,
Adam m and v). Over N data-parallel ranks, stage 1 shards the 12, stage 2 also the
gradients, stage 3 also the weights. Our sharded fp32 EMA adds 4/N bytes in every stage:

    stage 0: 2 + 2 + 12     + 4/N        stage 2: 2 + (2 + 12)/N + 4/N
    stage 1: 2 + 2 + 12/N   + 4/N        stage 3: (2 + 2 + 12)/N + 4/N

What is measured, on each rank, at the moment the formula describes (after backward, before
the optimizer step, in the second step so that Adam's state exists): the bytes of every
distinct tensor storage the DeepSpeed engine holds, attributed by where it hangs:

* weights: the module's parameters (under ZeRO-3 their partitions, ``param.ds_tensor``);
* grads: the parameters' ``.grad`` and the gradient partitions the ZeRO optimizer keeps
  (its attributes whose name mentions "grad");
* fp32 state: the fp32 master partitions the inner torch optimizer steps, and its state
  (exp_avg, exp_avg_sq);
* EMA: the shadow tensors of this rank's ``scaletrain.train.ema.ShardedEMA``;
* buffers: every other live tensor (communication buckets, the batch, activations kept).

The formula is compared with weights + grads + fp32 state + EMA ("model states"); buffers
are shown beside it, as is the peak RSS growth of the process from before the model was
built (which also counts allocator slack and the transient fp32 gradients of the step).
Model: a stack of ``depth`` bias-free Linear(width, width) layers, built in bf16 (inside
``deepspeed.zero.Init`` for stage 3, so no rank ever holds the full weights).

Run:  PYTHONPATH=. python benchmarks/bench_zero_memory.py [--width 2048 --depth 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CATEGORIES = ("weights", "grads", "fp32_state", "ema")
MiB = 2**20


def formula_bytes_per_param(stage: int, world: int) -> dict[str, float]:
    """Bytes per parameter each rank holds, by category (see the module docstring)."""
    return {
        "weights": 2.0 / world if stage >= 3 else 2.0,
        "grads": 2.0 / world if stage >= 2 else 2.0,
        "fp32_state": 12.0 / world if stage >= 1 else 12.0,
        "ema": 4.0 / world,
    }


# --------------------------------------------------------------------------- worker


def _ds_config(stage: int, bucket_elements: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": stage,
            # Communication buckets default to 5e8 elements (1 GB of bf16), made for
            # billion-parameter models; sized to the model here so that they do not swamp a
            # 34M-parameter benchmark. They are reported as buffers, outside the formula.
            "reduce_bucket_size": bucket_elements,
            "allgather_bucket_size": bucket_elements,
            "stage3_prefetch_bucket_size": bucket_elements,
            # Likewise ZeRO-3 keeps up to 1e9 gathered parameters alive (and never frees one
            # it will reuse within 1e9 elements): on a small model, every layer stays gathered
            # from forward to backward. One layer's worth, as on a model of billions.
            "stage3_max_live_parameters": bucket_elements,
            "stage3_max_reuse_distance": bucket_elements,
            "stage3_param_persistence_threshold": 0,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


class _Ledger:
    """Distinct tensor storages, each counted once, in the first category that claims it."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.seen: set[int] = set()
        self.bytes = dict.fromkeys((*CATEGORIES, "buffers"), 0)

    def add(self, category: str, tensor) -> None:
        if tensor is None or not self.torch.is_tensor(tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.bytes[category] += storage.nbytes()

    def add_nested(self, category: str, obj, depth: int = 0) -> None:
        if depth > 3:
            return
        if self.torch.is_tensor(obj):
            self.add(category, obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                self.add_nested(category, value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                self.add_nested(category, value, depth + 1)


def _measure(engine, ema) -> dict[str, int]:
    ledger = _Ledger()
    params = list(engine.module.parameters())
    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)
    for p in params:
        ledger.add("weights", p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    # Gradients: on the parameters, on the fp32 master partitions, and the partitions and
    # flat buffers the ZeRO optimizer keeps under names that say "grad".
    for p in params:
        ledger.add("grads", p.grad)
    masters = [p for group in inner.param_groups for p in group["params"]]
    for p in masters:
        ledger.add("grads", p.grad)
    for name, value in vars(zero_opt).items():
        if "grad" in name.lower():
            ledger.add_nested("grads", value)
    # fp32 state: the master partitions (in the inner optimizer's groups, and under names
    # with "fp32"/"master": ZeRO-3 swaps them into the groups only during its step) and
    # Adam's exp_avg / exp_avg_sq.
    for p in masters:
        ledger.add("fp32_state", p)
    for name, value in vars(zero_opt).items():
        if "fp32" in name.lower() or "master" in name.lower():
            ledger.add_nested("fp32_state", value)
    for state in inner.state.values():
        ledger.add_nested("fp32_state", state)
    for shadow in ema.shadow:
        ledger.add("ema", shadow)
    gc.collect()
    for obj in gc.get_objects():
        try:
            is_tensor = ledger.torch.is_tensor(obj)
        except Exception:  # noqa: BLE001 - exotic objects in gc lists
            continue
        if is_tensor:
            ledger.add("buffers", obj)
    return ledger.bytes


def run_worker(stage: int, width: int, depth: int, out_path: Path) -> None:
    import torch
    from torch import nn

    from scaletrain.core.dist_env import dist_env_from_environ, import_deepspeed
    from scaletrain.train.config import EMAConfig
    from scaletrain.train.ema import ShardedEMA, master_weight_fragments

    deepspeed = import_deepspeed()  # CPU accelerator, no JIT build of the shm comm op

    torch.set_num_threads(1)
    env = dist_env_from_environ()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    config = _ds_config(stage, bucket_elements=width * width)

    def build(width, depth):
        def layers():
            return [nn.Linear(width, width, bias=False, dtype=torch.bfloat16) for _ in range(depth)]

        if stage == 3:  # partitioned as each layer is built
            with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
                return nn.Sequential(*layers())
        return nn.Sequential(*layers())

    # A throw-away engine on a tiny model first: deepspeed.initialize imports torch._dynamo
    # and friends (~200 MB of RSS), which would otherwise count as this stage's memory.
    tiny = build(8, 1)
    deepspeed.initialize(model=tiny, model_parameters=tiny.parameters(), config=config)
    del tiny
    gc.collect()
    rss_before = _rss_bytes()

    model = build(width, depth)
    num_params = depth * width * width
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    del model
    generator = torch.Generator().manual_seed(env.rank)

    def forward_backward():
        x = torch.randn(4, width, generator=generator).to(torch.bfloat16)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)

    forward_backward()
    engine.step()  # the first step creates Adam's state
    # The engine's sharded fp32 EMA: each rank averages only the master values it owns.
    ema = ShardedEMA(
        EMAConfig(), master_weight_fragments(engine.module.named_parameters(), env.rank, env.world_size)
    )
    ema.update(samples_after=8, batch_samples=8)

    # Two snapshots of the second step; the larger is the step's peak of model states.
    # (1) Backward has produced the gradients but DeepSpeed has not reduced them yet: the
    # moment stages 0 and 1 hold full gradients (stage 2/3 reduce during backward). The
    # engine calls this private hook from backward(); wrapping it is for measurement only.
    snapshots = []
    epilogue = engine._backward_epilogue

    def snapshot():
        held = _measure(engine, ema)
        snapshots.append((held, _rss_bytes()))

    def measured_epilogue():
        snapshot()
        epilogue()

    peak_rss_with_setup = _peak_rss_bytes()
    gc.collect()
    _reset_peak_rss()  # from here VmHWM is the peak of one steady-state training step
    engine._backward_epilogue = measured_epilogue
    forward_backward()
    engine._backward_epilogue = epilogue
    # (2) After backward, before the optimizer step.
    snapshot()
    held, rss_at_snapshot = max(snapshots, key=lambda s: sum(s[0][c] for c in CATEGORIES))
    engine.step()
    ema.update(samples_after=16, batch_samples=8)
    peak_rss_step = _peak_rss_bytes()
    result = {
        "rank": env.rank,
        "world": env.world_size,
        "stage": stage,
        "params": num_params,
        "held": held,
        "rss_before": rss_before,
        "rss_at_snapshot": rss_at_snapshot,
        "peak_rss_step": peak_rss_step,
        "peak_rss_with_setup": peak_rss_with_setup,
    }
    out_path.write_text(json.dumps(result), encoding="utf-8")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(stage: int, world: int, width: int, depth: int, timeout: float) -> list[dict]:
    """Launch ``world`` worker processes for one stage; return their results by rank."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1",
                # A fixed mmap threshold makes glibc return every freed tensor of 64 KiB or
                # more to the OS, so RSS tracks live tensors instead of retained heap (the
                # default threshold grows to 32 MiB after large frees, and then keeps them).
                MALLOC_MMAP_THRESHOLD_="65536",
            )
            cmd = [
                sys.executable, str(Path(__file__).resolve()), "--worker",
                "--stage", str(stage), "--width", str(width), "--depth", str(depth),
                "--out", str(Path(tmp) / f"rank{rank}.json"),
            ]
            log = open(Path(tmp) / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        failed = []
        for rank, (proc, log) in enumerate(procs):
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "timeout"
            log.close()
            if code != 0:
                failed.append((rank, code))
        if failed:
            tails = "\n".join(
                f"--- rank {r} (exit {c}):\n"
                + (Path(tmp) / f"rank{r}.log").read_text()[-3000:]
                for r, c in failed
            )
            raise RuntimeError(f"ZeRO stage {stage} workers failed:\n{tails}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def _table(results: dict[int, list[dict]], world: int) -> str:
    lines = [
        "| ZeRO stage (rank) | formula B/param | formula MiB | measured model states MiB "
        "(w + g + fp32 + EMA) | measured / formula | buffers MiB | RSS at that moment MiB "
        "(/ formula) | peak RSS of the step MiB (/ formula) | peak RSS, set-up + first step MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage, ranks in sorted(results.items()):
        per_param = formula_bytes_per_param(stage, world)
        for r in ranks:
            params = r["params"]
            formula = sum(per_param.values()) * params
            held = r["held"]
            measured = sum(held[c] for c in CATEGORIES)
            parts = " + ".join(f"{held[c] / MiB:.1f}" for c in CATEGORIES)
            step_rss = r["peak_rss_step"] - r["rss_before"]
            rss = r["rss_at_snapshot"] - r["rss_before"]
            lines.append(
                f"| {stage} (rank {r['rank']}) | {sum(per_param.values()):.1f} | "
                f"{formula / MiB:.1f} | {measured / MiB:.1f} ({parts}) | "
                f"{measured / formula:.3f} | {held['buffers'] / MiB:.1f} | "
                f"{rss / MiB:.1f} ({rss / formula:.2f}) | "
                f"{step_rss / MiB:.1f} ({step_rss / formula:.2f}) | "
                f"{(r['peak_rss_with_setup'] - r['rss_before']) / MiB:.1f} |"
            )
    return "\n".join(lines)


def _section(table, params, args, command, machine, revision) -> str:
    return f"""## ZeRO memory per rank (DeepSpeed, {args.world} ranks, bf16, AdamW)

Model: {args.depth} x Linear({args.width}, {args.width}), {params / 1e6:.1f}M parameters.
Formula per parameter (ZeRO paper, §3.1): bf16 weights 2 + bf16 grads 2 + fp32 master, m, v
12, divided over N = {args.world} ranks as the stage shards them, plus the sharded fp32 EMA
4/N. "Measured model states" are the bytes of the distinct tensor storages DeepSpeed holds
on the rank at the step's peak (gradients produced, before the optimizer step), split as
weights + grads + fp32 master/Adam + EMA (the engine's `ShardedEMA`). Buffers are every
other live tensor (communication buckets, sized here to one layer; the batch). The RSS
columns are resident memory minus the RSS before the model was built (workers run with
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS): at the moment of the
measurement, then the peak over one steady-state training step (the second; peak mark
reset through /proc/self/clear_refs before it), then the peak over building the model and
engine plus the first step. The step's peak exceeds the model states by its transients,
which the formula leaves out and which are full-size here because ZeRO flattens each
rank's partition into one tensor: the fp32 copy of the gradient partition the optimizer
steps on, the temporaries of gradient clipping and of torch's multi-tensor AdamW, the EMA
update. On GPU the same split shows as `max_memory_allocated` above the formula.

{table}

Command: `{command}`
Machine: {machine}; revision {revision}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.stage, args.width, args.depth, args.out)
        return 0

    results = {s: run_stage(s, args.world, args.width, args.depth, args.timeout) for s in args.stages}
    table = _table(results, args.world)
    print(table)
    if not args.no_write:
        from benchmarks.report import git_revision, machine_description, write_section

        shown = argv if argv is not None else sys.argv[1:]
        command = " ".join(["PYTHONPATH=. python benchmarks/bench_zero_memory.py", *shown])
        params = args.depth * args.width * args.width
        write_section("zero_memory", _section(table, params, args, command, machine_description(),
                                              git_revision()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
