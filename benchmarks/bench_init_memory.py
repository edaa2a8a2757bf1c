"""Peak memory of initialising a ZeRO-3 run from a released-weights file (model.init_from).

What it shows: each rank of a ZeRO-3 run reads only the rows of each parameter that cover
its partition (scaletrain.train.init_weights), so the resident memory it adds while loading
is a fraction of the file, not a full copy of the model per rank. The baseline, measured in
the same processes right after, is the simple way: every tensor of the file read into memory
on every rank (what ``model.load_state_dict(load_file(path))`` needs at least).

Each of ``--world`` ranks (the project's local launcher) builds an MMDiT under DeepSpeed
ZeRO-3 in bf16 with the sharded EMA, then the peak-RSS mark is reset (/proc/self/clear_refs)
and the real initialisation path runs (``open_init_source`` + ``start_weights``: fp32
source values into the bf16 partitions and the fp32 master partitions, the EMA restarted,
rank 0 hashing the file for the run's record). RSS is the process's resident set: anonymous
memory plus the pages of memory-mapped files it touched (the safetensors file is mapped).

Run:  PYTHONPATH=. python benchmarks/bench_init_memory.py [--depth 6 --heads 16 --world 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def model_config(args, init_from: str | None = None):
    from scaletrain.models.config import MMDiTConfig

    return MMDiTConfig(depth=args.depth, num_heads=args.heads, head_dim=64, in_channels=16,
                       sample_size=32, pos_embed_max_size=32, joint_attention_dim=1024,
                       pooled_projection_dim=512, text_seq_len=16, init_from=init_from)


# --------------------------------------------------------------------------- worker


def run_worker(args) -> None:
    import torch.distributed as dist
    from safetensors import safe_open

    from scaletrain.core.dist_env import dist_env_from_environ
    from scaletrain.train.checkpoint import TrainState
    from scaletrain.train.config import EMAConfig, TrainConfig
    from scaletrain.train.ema import ShardedEMA, master_weight_fragments
    from scaletrain.train.engine import build_engine, init_distributed
    from scaletrain.train.init_weights import open_init_source, start_weights

    env = dist_env_from_environ()
    train = TrainConfig(zero_stage=3, bf16=True)
    device = init_distributed(train, env)
    cfg = model_config(args, str(args.file))
    rss_start = _status_kib("VmRSS") * 1024
    engine = build_engine(train, cfg, 1, env.world_size, 0, device)
    ema = ShardedEMA(EMAConfig(), master_weight_fragments(engine.module.named_parameters(),
                                                          env.rank, env.world_size))
    dist.barrier()
    rss_built = _status_kib("VmRSS") * 1024
    _reset_peak()
    start = time.perf_counter()
    source = open_init_source(cfg, args.run_dir, resume=False)
    start_weights(source, cfg, run_dir=args.run_dir, engine=engine, ema=ema,
                  state=TrainState(), resumed=None, rank=env.rank)
    seconds = time.perf_counter() - start
    peak_init = _status_kib("VmHWM") * 1024
    rss_after = _status_kib("VmRSS") * 1024
    dist.barrier()

    _reset_peak()  # the baseline: the whole file in memory on this rank
    base_start = _status_kib("VmRSS") * 1024
    with safe_open(str(args.file), framework="pt", device="cpu") as handle:
        state = {k: handle.get_tensor(k).clone() for k in handle.keys()}
    peak_baseline = _status_kib("VmHWM") * 1024
    del state
    dist.barrier()
    Path(args.out_dir, f"rank{env.rank}.json").write_text(json.dumps({
        "rank": env.rank, "rss_start": rss_start, "rss_built": rss_built,
        "peak_init": peak_init, "rss_after": rss_after, "seconds": seconds,
        "baseline_start": base_start, "peak_baseline": peak_baseline,
    }))


# --------------------------------------------------------------------------- launcher


def run(args) -> tuple[list[dict], int, int]:
    import torch
    from safetensors.torch import save_file

    from scaletrain.launch.local import launch_local
    from scaletrain.models import build_model

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "diffusion_pytorch_model.safetensors"
        torch.manual_seed(0)
        model = build_model(model_config(args))
        params = sum(p.numel() for p in model.parameters())
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
        del model
        size = file.stat().st_size
        worker = [sys.executable, str(Path(__file__).resolve()), "--worker",
                  "--depth", str(args.depth), "--heads", str(args.heads), "--file", str(file),
                  "--run-dir", str(Path(tmp) / "run"), "--out-dir", tmp]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   # freed tensors of 64 KiB or more go back to the OS: RSS tracks live memory
                   MALLOC_MMAP_THRESHOLD_="65536")
        code = launch_local([], args.world, env=env, program=worker)
        if code != 0:
            raise RuntimeError(f"workers failed with status {code}")
        results = [json.loads((Path(tmp) / f"rank{r}.json").read_text())
                   for r in range(args.world)]
    return results, params, size


def table(results: list[dict], params: int, size: int, world: int) -> str:
    lines = ["| rank | file MiB | own partition, fp32 MiB | RSS before init MiB | peak RSS added "
             "by init MiB (/ file) | init s | peak RSS added by a full copy MiB (/ file) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        added = r["peak_init"] - r["rss_built"]
        base = r["peak_baseline"] - r["baseline_start"]
        lines.append(
            f"| {r['rank']} | {size / MiB:.0f} | {4 * params / world / MiB:.0f} | "
            f"{r['rss_built'] / MiB:.0f} | {added / MiB:.0f} ({added / size:.2f}) | "
            f"{r['seconds']:.1f} | {base / MiB:.0f} ({base / size:.2f}) |")
    return "\n".join(lines)


def section(text: str, params: int, args, command: str, machine: str, revision: str) -> str:
    return f"""## Initialising a ZeRO-3 run from a file (model.init_from), {args.world} ranks

An MMDiT of {params / 1e6:.0f}M parameters (depth {args.depth}, {args.heads} heads of 64)
saved as one fp32 safetensors file, loaded by `scaletrain.train.init_weights` into a ZeRO-3
bf16 engine with the sharded EMA: each rank reads only the rows covering its partitions and
writes them into its bf16 partition and its fp32 master partition. "Peak RSS added by init"
is the resident memory above what the built engine held (peak mark reset just before), memory-
mapped file pages included; rank 0 also hashes the file (sha256) for the run's record. The
last column is the baseline in the same processes: every tensor of the file copied into
memory (`get_tensor(...).clone()` of each), as `load_state_dict(load_file(path))` does: the
file's mapped pages plus one full fp32 copy, on every rank. "Init s" includes rank 0's
sha256 of the file, which runs beside the loading.

{text}

Command: `{command}`
Machine: {machine}; revision {revision}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    results, params, size = run(args)
    text = table(results, params, size, args.world)
    print(text)
    if not args.no_write:
        from benchmarks.report import git_revision, machine_description, write_section

        shown = argv if argv is not None else sys.argv[1:]
        command = " ".join(["PYTHONPATH=. python benchmarks/bench_init_memory.py", *shown])
        write_section("init_memory", section(text, params, args, command,
                                             machine_description(), git_revision()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
