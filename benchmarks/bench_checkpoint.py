"""Checkpoint save and load bandwidth of a >= 300M-parameter model, next to `dd` on the same disk.

    PYTHONPATH=. python benchmarks/bench_checkpoint.py [--dir DIR] [--stages 2 3] [--repeats 2]

Writes the "checkpoint" section of docs/benchmarks.md (``--no-write`` to only print).

Two ranks (gloo, CPU) build an MMDiT of ~330M parameters (hidden 1024, depth 9) under
DeepSpeed ZeRO-2 or ZeRO-3 with bf16 weights, fp32 master weights, Adam moments (one real
optimizer step creates them) and the sharded EMA, then time ``CheckpointManager.save()``
(everything a training run does: DeepSpeed's files, the per-rank EMA/data/RNG files, fsync
and sha256 of every file, the manifest, the COMPLETE marker) and ``CheckpointManager.restore()``
(verify the manifest's hashes, then load). Before each load the checkpoint's pages are
dropped from the page cache (posix_fadvise DONTNEED after fsync), so the load reads the disk.

The reference: ``dd if=/dev/zero bs=16M conv=fdatasync`` of the same number of bytes in the
same directory (sequential write, flushed), and ``dd iflag=direct`` reading it back. Every
figure is GB/s = checkpoint bytes / seconds (1 GB = 1e9 bytes).

The asynchronous save (``checkpoint.async_save=true``) is timed too, on the same engine: the
training stall (how long ``save()`` blocks the loop: the copy of every tensor to host memory)
and the time until its COMPLETE marker (``save()`` plus ``wait()`` with no training between,
so the background write has both cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.report import git_revision, machine_description, publish  # noqa: E402
from scaletrain.config import load_config  # noqa: E402
from scaletrain.core.dist_env import free_port  # noqa: E402

MODEL = REPO / "configs" / "models" / "tiny_mmdit.yaml"
MODEL_OVERRIDES = ["model.num_heads=16", "model.head_dim=64", "model.depth=9",
                   "model.joint_attention_dim=256", "model.pooled_projection_dim=256",
                   "model.sample_size=8", "model.pos_embed_max_size=8", "model.text_seq_len=8"]
WORLD = 2


def drop_cache(root: Path) -> None:
    """Evict the files under root from the page cache (they are fsynced, so clean)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def worker(rank: int, stage: int, run_dir: str, port: int, repeats: int, out: dict) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    from scaletrain.core.dist_env import dist_env_from_environ
    from scaletrain.models.inputs import example_inputs
    from scaletrain.train.checkpoint import CheckpointManager, PerRank, TrainState, checkpoint_bytes
    from scaletrain.train.config import CheckpointConfig, EMAConfig
    from scaletrain.train.ema import ShardedEMA, master_weight_fragments
    from scaletrain.train.engine import build_engine, init_distributed

    cfg = load_config(MODEL, MODEL_OVERRIDES + [f"train.zero_stage={stage}", "train.bf16=true"])
    device = init_distributed(cfg.train, dist_env_from_environ())
    engine = build_engine(cfg.train, cfg.model, 1, WORLD, 0, device)
    # One real step, so that the optimizer holds its Adam moments as in a running job.
    inputs = example_inputs(cfg.model, batch_size=1, dtype=torch.bfloat16)
    engine.backward(engine(**inputs).float().square().mean())
    engine.step()
    ema = ShardedEMA(EMAConfig(), master_weight_fragments(engine.module.named_parameters(),
                                                          rank, WORLD))
    ema.update(WORLD, WORLD)
    state = TrainState(step=1, samples_seen=WORLD)

    def manager_for(async_save: bool) -> CheckpointManager:
        return CheckpointManager(
            CheckpointConfig(every=1, keep_last=1, async_save=async_save), run_dir, rank=rank,
            world_size=WORLD, zero_stage=stage, engine=engine, train_state=state,
            per_rank={"ema": PerRank(ema.state_dict, ema.load_state_dict, ema.load_shards)},
            run_info=lambda: {}, config_yaml="")

    manager, async_manager = manager_for(False), manager_for(True)
    saves, loads, stalls, completes = [], [], [], []
    for i in range(repeats):
        # Steps increase save after save, so that each save is the newest checkpoint (the
        # one restore() loads) and pruning (keep_last=1) removes only older ones.
        state.step = 2 * i + 1
        dist.barrier()
        start = time.perf_counter()
        ckpt = manager.save()
        saves.append(time.perf_counter() - start)
        nbytes = checkpoint_bytes(ckpt)  # before the async save's commit prunes it
        if rank == 0:
            drop_cache(ckpt)
        dist.barrier()
        start = time.perf_counter()
        manager.restore()
        loads.append(time.perf_counter() - start)
        state.step = 2 * i + 2
        dist.barrier()
        start = time.perf_counter()
        async_manager.save()
        stalls.append(time.perf_counter() - start)
        async_manager.wait()
        completes.append(time.perf_counter() - start)
    if rank == 0:
        out.update(saves=saves, loads=loads, stalls=stalls, completes=completes,
                   bytes=nbytes,
                   params=sum(getattr(p, "ds_numel", p.numel())
                              for p in engine.module.parameters()))
    dist.barrier()
    dist.destroy_process_group()


def run_stage(stage: int, directory: Path, repeats: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"ckpt_z{stage}_", dir=directory))
    try:
        with mp.Manager() as manager:
            out = manager.dict()
            mp.spawn(worker, args=(stage, str(run_dir), free_port(), repeats, out), nprocs=WORLD)
            return dict(out)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def dd_rates(directory: Path, nbytes: int) -> tuple[float, float]:
    """(write, read) GB/s of a sequential dd of nbytes in directory (flushed; O_DIRECT read)."""
    path = directory / "dd.bin"
    count = max(1, nbytes // (16 << 20))
    try:
        start = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}",
                        "conv=fdatasync"], check=True, capture_output=True)
        write = count * (16 << 20) / (time.perf_counter() - start) / 1e9
        start = time.perf_counter()
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"],
                       check=True, capture_output=True)
        read = count * (16 << 20) / (time.perf_counter() - start) / 1e9
        return write, read
    finally:
        path.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = []
    for stage in args.stages:
        res = run_stage(stage, args.dir, args.repeats)
        dd_write, dd_read = [], []
        for _ in range(args.repeats):  # dd next to each stage's run, same bytes
            w, r = dd_rates(args.dir, res["bytes"])
            dd_write.append(w)
            dd_read.append(r)
        gb = res["bytes"] / 1e9
        row = {"stage": stage, "params": res["params"], "gb": gb,
               "save_s": statistics.median(res["saves"]), "load_s": statistics.median(res["loads"]),
               "dd_write": statistics.median(dd_write), "dd_read": statistics.median(dd_read),
               # The first async save allocates its host copy; later ones refill it.
               "first_stall_s": res["stalls"][0],
               "stall_s": statistics.median(res["stalls"][1:] or [float("nan")]),
               "complete_s": statistics.median(res["completes"])}
        row["save"] = gb / row["save_s"]
        row["load"] = gb / row["load_s"]
        print(f"ZeRO-{stage}: {row['params'] / 1e6:.0f}M params, {gb:.2f} GB; save "
              f"{row['save_s']:.1f} s = {row['save']:.2f} GB/s (dd {row['dd_write']:.2f}); load "
              f"{row['load_s']:.1f} s = {row['load']:.2f} GB/s (dd read {row['dd_read']:.2f}); "
              f"async save: stall {row['first_stall_s']:.2f} s first, {row['stall_s']:.2f} s "
              f"later, COMPLETE after "
              f"{row['complete_s']:.1f} s", flush=True)
        rows.append(row)
    lines = [
        "## Checkpoint save and load (benchmarks/bench_checkpoint.py)",
        "",
        f"Command: `PYTHONPATH=. python benchmarks/bench_checkpoint.py --repeats {args.repeats}`"
        f" (git {git_revision()})",
        "",
        f"Machine: {machine_description()}; checkpoint directory on "
        f"{_filesystem(args.dir)}. Two ranks (gloo), bf16 weights, fp32 master weights, Adam "
        "moments, sharded EMA (see the script's docstring); medians of "
        f"{args.repeats} saves and loads. Save includes fsync and sha256 of every file, the "
        "manifest and the COMPLETE marker; load includes verifying the hashes and reads a "
        "cold page cache. `dd`: the same bytes written sequentially (`conv=fdatasync`) and "
        "read back with O_DIRECT in the same directory. Async (`checkpoint.async_save=true`): "
        "stall = how long `save()` blocks the training loop (every tensor copied to host "
        "memory: the first save of a run allocates that copy, later saves refill it in "
        "place), COMPLETE = until its marker is written (`save()` + `wait()`, no training "
        "in between).",
        "",
        "| ZeRO | params | checkpoint GB | save s | save GB/s | dd write GB/s | save / dd | "
        "load s | load GB/s | dd read GB/s | async stall s: first save | later saves | "
        "later stall / save | async COMPLETE s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['params'] / 1e6:.0f}M | {r['gb']:.2f} | {r['save_s']:.1f} | "
            f"{r['save']:.2f} | {r['dd_write']:.2f} | **{100 * r['save'] / r['dd_write']:.0f}%** | "
            f"{r['load_s']:.1f} | {r['load']:.2f} | {r['dd_read']:.2f} | "
            f"{r['first_stall_s']:.2f} | {r['stall_s']:.2f} | "
            f"**{100 * r['stall_s'] / r['save_s']:.0f}%** | {r['complete_s']:.1f} |")
    text = "\n".join(lines)
    publish("checkpoint", text, write=not args.no_write)
    return 0


def _filesystem(directory: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(directory)], capture_output=True, text=True,
                             check=True).stdout.splitlines()[-1].split()
        return f"{out[0]} ({out[1]})"
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
