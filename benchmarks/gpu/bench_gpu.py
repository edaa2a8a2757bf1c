"""bf16 training-step throughput on one GPU, and SDXL-VAE encode speed (run by run.sh).

    python benchmarks/gpu/bench_gpu.py [--out DIR] [--no-write]
    python benchmarks/gpu/bench_gpu.py --smoke --out /tmp/smoke --no-write   # CPU, tiny models

For each model (``mmdit_2b`` at 64x64 latents, ``sdxl_unet`` at 128x128 latents) and each of
``train.compile: none`` and ``blocks``: one rank, DeepSpeed ZeRO-2, bf16, torch's fused
AdamW (scaletrain's engine as ``scaletrain train`` builds it). The batch is the largest power
of two that runs two steps without running out of memory (searched eagerly, reused compiled);
then ``--steps`` steps are timed after ``--warmup`` (which holds the compile). The step is
the model's forward on random inputs, a mean-square loss, DeepSpeed's backward and step.

Reported: seconds per step, samples/s, model TFLOP/s (3 x the forward FLOPs that
``scaletrain model-info`` counts, per second), MFU against the device's dense bf16 peak
(scaletrain.train.monitor.throughput's table), peak allocated memory. Then the SDXL VAE
(diffusers AutoencoderKL with SDXL's architecture, random weights, bf16) encoding 1024x1024
images: images/s at the largest power-of-two batch up to 8.

Writes ``DIR/gpu_bench.json`` and ``DIR/gpu_bench.md`` and the "gpu" section of
docs/benchmarks.md. ``--smoke`` runs the same code on the CPU with the tiny presets at 16x16
latents, a tiny VAE at 64x64 and batches up to 2, to show that the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.report import git_revision, machine_description, publish  # noqa: E402
from scaletrain.config import load_config  # noqa: E402
from scaletrain.models.info import model_info  # noqa: E402
from scaletrain.models.inputs import example_inputs  # noqa: E402

MODELS = REPO / "configs" / "models"
# (name, preset, latent side); the smoke run uses the tiny presets instead.
RUNS = [("mmdit_2b", "mmdit_2b.yaml", 64), ("sdxl_unet", "sdxl_unet.yaml", 128)]
SMOKE_RUNS = [("tiny_mmdit", "tiny_mmdit.yaml", 16), ("tiny_unet", "tiny_unet.yaml", 16)]
# SDXL's VAE (stabilityai/sdxl-vae config.json); the smoke run uses tiny widths.
SDXL_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
            "norm_num_groups": 32}
SMOKE_VAE = {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 8}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_step(engine, cfg, batch: int, device: torch.device) -> None:
    inputs = example_inputs(cfg.model, batch_size=batch, device=device, dtype=torch.bfloat16)
    out = engine(**inputs)
    engine.backward(out.float().square().mean())
    engine.step()


def largest_batch(engine, cfg, device, max_batch: int) -> int:
    """The largest power of two up to max_batch that runs two steps (0 if even 1 does not)."""
    best, batch = 0, 1
    while batch <= max_batch:
        try:
            for _ in range(2):
                _one_step(engine, cfg, batch, device)
            _sync(device)
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            engine.optimizer.zero_grad()
            _free(device)
            break
        best, batch = batch, batch * 2
    return best


def bench_model(name, preset, side, compile_mode, batch, args, device, peak) -> dict:
    from scaletrain.train.engine import build_engine

    cfg = load_config(MODELS / preset, [f"model.sample_size={side}", "train.bf16=true",
                                        "train.zero_stage=2", f"train.compile={compile_mode}"])
    row = {"model": name, "latent": side, "compile": compile_mode}
    engine = build_engine(cfg.train, cfg.model, max(batch, 1), 1, 0, device)
    try:
        if batch == 0:
            batch = largest_batch(engine, cfg, device, args.max_batch)
        row["batch"] = batch
        if batch == 0:
            row["error"] = "batch 1 does not fit"
            return row
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.warmup):
            _one_step(engine, cfg, batch, device)
        _sync(device)
        row["warmup_s"] = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.steps):
            _one_step(engine, cfg, batch, device)
        _sync(device)
        step_s = (time.perf_counter() - start) / args.steps
        forward = model_info(cfg.model, with_backward=False)["flops_per_sample"]
        tflops = 3 * forward * batch / step_s / 1e12
        row.update(step_s=step_s, samples_per_s=batch / step_s, model_tflops=tflops,
                   mfu=tflops / peak if peak else None,
                   params=model_info(cfg.model, with_backward=False)["params"],
                   peak_mem_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                                 if device.type == "cuda" else None))
    except RuntimeError as exc:  # one failed configuration must not hide the others
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        del engine
        _free(device)
    return row


def bench_vae(args, device) -> dict:
    from diffusers import AutoencoderKL

    spec = SMOKE_VAE if args.smoke else SDXL_VAE
    size = 64 if args.smoke else 1024
    n = len(spec["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, latent_channels=4,
                        sample_size=size, **spec).to(device, torch.bfloat16).eval()
    row = {"model": "sdxl_vae_encode" if not args.smoke else "tiny_vae_encode", "size": size,
           "params": sum(p.numel() for p in vae.parameters())}

    def encode(batch):
        x = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            vae.encode(x).latent_dist.sample()

    best, batch = 0, 1
    while batch <= (2 if args.smoke else 8):
        try:
            encode(batch)
            _sync(device)
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            _free(device)
            break
        best, batch = batch, batch * 2
    row["batch"] = best
    if best:
        encode(best)
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            encode(best)
        _sync(device)
        row["images_per_s"] = best * args.steps / (time.perf_counter() - start)
    return row


def render(rows: list[dict], vae: dict, machine: str, command: str) -> str:
    def num(value, fmt):
        return "" if value is None else format(value, fmt)

    lines = ["## One GPU: training step and VAE encode (benchmarks/gpu/run.sh)", "",
             f"Command: `{command}` (git {git_revision()})", "", f"Machine: {machine}.", "",
             "One rank, DeepSpeed ZeRO-2, bf16, fused AdamW; batch = the largest power of two "
             "that fits; TFLOP/s counts 3 x the forward FLOPs of `scaletrain model-info`; MFU "
             "against the dense bf16 peak (see benchmarks/gpu/bench_gpu.py).", "",
             "| model | latents | compile | batch | s/step | samples/s | TFLOP/s | MFU | "
             "peak mem GiB | warm-up s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['latent']}x{r['latent']} | {r['compile']} | "
                         f"{r.get('batch', '')} | {r['error']} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        lines.append(f"| {r['model']} | {r['latent']}x{r['latent']} | {r['compile']} | "
                     f"{r['batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | "
                     f"{r['model_tflops']:.1f} | {mfu} | {num(r.get('peak_mem_gib'), '.1f')} | "
                     f"{r['warmup_s']:.0f} |")
    lines += ["", f"{vae['model']} ({vae['params'] / 1e6:.0f}M params, random weights, bf16) "
              f"at {vae['size']}x{vae['size']}, batch {vae['batch']}: "
              f"**{num(vae.get('images_per_s'), '.1f')} images/s**."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gpu" / "results")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny presets: a check")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--compile", nargs="+", default=["none", "blocks"])
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.max_batch = min(args.steps, 2), 1, 2
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    from scaletrain.core.dist_env import dist_env_from_environ
    from scaletrain.train.config import TrainConfig
    from scaletrain.train.engine import init_distributed
    from scaletrain.train.monitor.throughput import device_peak_tflops

    device = init_distributed(TrainConfig(), dist_env_from_environ())
    peak = device_peak_tflops(device)
    rows = []
    for name, preset, side in (SMOKE_RUNS if args.smoke else RUNS):
        batch = 0  # searched under the first compile mode, reused by the others
        for mode in args.compile:
            row = bench_model(name, preset, side, mode, batch, args, device, peak)
            batch = row.get("batch", 0) or batch
            print(json.dumps(row), flush=True)
            rows.append(row)
    vae = bench_vae(args, device)
    print(json.dumps(vae), flush=True)
    machine = machine_description()
    command = "benchmarks/gpu/run.sh" if not args.smoke else "bench_gpu.py --smoke"
    text = render(rows, vae, machine, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(
        {"machine": machine, "git": git_revision(), "peak_tflops": peak, "steps": rows,
         "vae": vae}, indent=1))
    (args.out / "gpu_bench.md").write_text(text + "\n")
    publish("gpu", text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
