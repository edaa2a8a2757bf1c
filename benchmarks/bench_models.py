"""Forward+backward time of our U-Net and MMDiT against diffusers' at identical configurations.

    PYTHONPATH=. python benchmarks/bench_models.py [--repeats 15] [--threads 1] [--no-write]

Both sides get the same weights (ours are loaded into diffusers' class by name, and the
outputs are checked equal before timing) and the same inputs. Repeats are interleaved
(ours, diffusers, diffusers, ours, ...) so that load from other processes on a shared
machine hits both alike; the figure is the ratio of medians, ours / diffusers (< 1 = ours
faster). Writes the "models" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import git_revision, machine_description, write_section  # noqa: E402
from scaletrain.config import load_config  # noqa: E402
from scaletrain.models import UNetConfig, build_model, count_parameters  # noqa: E402
from scaletrain.models.diffusers_compat import diffusers_config, to_diffusers_state_dict  # noqa: E402
from scaletrain.models.info import model_info  # noqa: E402
from scaletrain.models.inputs import example_inputs  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
UNET = load_config(CONFIGS / "bench_unet.yaml").model
MMDIT = load_config(CONFIGS / "bench_mmdit.yaml").model


def _pair(cfg):
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    ours = build_model(cfg)
    cls = UNet2DConditionModel if isinstance(cfg, UNetConfig) else SD3Transformer2DModel
    theirs = cls(**diffusers_config(cfg))
    state = to_diffusers_state_dict(ours.state_dict(), cfg)
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert set(missing) <= {"pos_embed.pos_embed"} and not unexpected, (missing, unexpected)
    return ours.train(), theirs.train()


def _step(model, inputs, is_ours: bool) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one forward+backward."""
    model.zero_grad(set_to_none=True)
    cpu, wall = time.process_time(), time.perf_counter()
    out = model(**inputs) if is_ours else model(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    return time.process_time() - cpu, time.perf_counter() - wall


def bench(cfg, batch: int, repeats: int, warmup: int) -> dict:
    ours, theirs = _pair(cfg)
    inputs = example_inputs(cfg, batch_size=batch, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(**inputs), theirs(**inputs, return_dict=False)[0]
    max_diff = float((a - b).abs().max())
    assert max_diff < 1e-3, f"outputs differ by {max_diff}: not the same computation"
    for _ in range(warmup):
        _step(ours, inputs, True)
        _step(theirs, inputs, False)
    t_ours, t_theirs = [], []
    for r in range(repeats):
        order = [(ours, True), (theirs, False)] if r % 2 == 0 else [(theirs, False), (ours, True)]
        for model, is_ours in order:
            (t_ours if is_ours else t_theirs).append(_step(model, inputs, is_ours))
    def median(times, which):
        return statistics.median(t[which] for t in times)

    cpu_ours, cpu_theirs = median(t_ours, 0), median(t_theirs, 0)
    # The minimum estimates the intrinsic cost: interference from other processes only adds.
    min_ours, min_theirs = min(t[0] for t in t_ours), min(t[0] for t in t_theirs)
    wall_ours, wall_theirs = median(t_ours, 1), median(t_theirs, 1)
    return {
        "params": count_parameters(ours),
        "ours_ms": 1e3 * cpu_ours,
        "diffusers_ms": 1e3 * cpu_theirs,
        "ratio": cpu_ours / cpu_theirs,
        "min_ratio": min_ours / min_theirs,
        "wall_ours_ms": 1e3 * wall_ours,
        "wall_diffusers_ms": 1e3 * wall_theirs,
        "wall_ratio": wall_ours / wall_theirs,
        "max_diff": max_diff,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name, cfg, theirs in (
        ("U-Net", UNET, "UNet2DConditionModel"),
        ("MMDiT", MMDIT, "SD3Transformer2DModel"),
    ):
        res = bench(cfg, args.batch, args.repeats, args.warmup)
        rows.append((name, theirs, res))
        print(
            f"{name}: {res['params'] / 1e6:.2f}M params, ours {res['ours_ms']:.1f} ms, "
            f"diffusers {res['diffusers_ms']:.1f} ms, ratio {res['ratio']:.3f} "
            f"(of minima {res['min_ratio']:.3f}) "
            f"(wall: {res['wall_ours_ms']:.1f} / {res['wall_diffusers_ms']:.1f} ms = "
            f"{res['wall_ratio']:.3f})",
            flush=True,
        )

    preset = load_config(Path(__file__).resolve().parent.parent / "configs/models/mmdit_2b.yaml").model
    info128 = model_info(preset)
    info64 = model_info(dataclasses.replace(preset, sample_size=64))

    command = "PYTHONPATH=. python benchmarks/bench_models.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "no_write"
    )
    lines = [
        "## Models: forward+backward vs diffusers (CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}, {args.threads} intra-op thread(s); git {git_revision()}.",
        "",
        "Median CPU time (this process's, so time spent descheduled by other processes does "
        "not count) of one forward+backward (loss = mean square of the output) at batch "
        f"{args.batch}, float32, over {args.repeats} interleaved repeats after {args.warmup} "
        "warm-ups; median wall times alongside. Both models hold the same weights and produce "
        "the same output (max abs diff shown). Ratio = ours / diffusers; below 1 = ours faster.",
        "",
        "| model | diffusers class | params | ours CPU ms | diffusers CPU ms | **ratio** "
        "| ratio of minima | wall ms (ours / diffusers) | wall ratio | max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, theirs, r in rows:
        lines.append(
            f"| {name} | {theirs} | {r['params'] / 1e6:.2f}M | {r['ours_ms']:.1f} | "
            f"{r['diffusers_ms']:.1f} | **{r['ratio']:.3f}** | {r['min_ratio']:.3f} | "
            f"{r['wall_ours_ms']:.1f} / "
            f"{r['wall_diffusers_ms']:.1f} | {r['wall_ratio']:.3f} | {r['max_diff']:.1e} |"
        )
    lines += [
        "",
        "U-Net: SDXL layout at 32x32x4 latents, channels (64, 128, 256), 2 ResBlocks per level, "
        "transformer depth (0, 1, 2), 77 text tokens of width 256. MMDiT: depth 4, hidden 256 "
        "(4 heads of 64), QK-norm, 32x32x16 latents (256 image tokens) + 77 text tokens.",
        "",
        "Both sides run the same GEMM, convolution and SDPA kernels on identical shapes; ours "
        "runs fewer elementwise ops (no per-ResBlock division by output_scale_factor=1, the "
        "SiLU of the time embedding computed once, no dropout(p=0) calls, no layout copies) and "
        "the MMDiT's last block skips the text queries whose outputs SD3 discards; so the "
        "expected result is parity or slightly better, not a large gap.",
        "",
        "The CPU is shared with other processes (several engineers' test runs on 2 cores; load "
        "average 4-15 while developing), so absolute times are noisy: the interleaving makes "
        "the load hit both sides alike, and the ratio is the figure to read. Repeated runs "
        "during development moved the median ratios by about +-0.04.",
        "",
        "GPU: no GPU was lent to this task, so the bf16 forward+backward time and MFU of "
        "mmdit_2b at 64x64 latents were **not measured**. For an MFU computation, "
        "`scaletrain model-info configs/models/mmdit_2b.yaml model.sample_size=64 --json` gives "
        f"{info64['flops_per_sample'] / 1e12:.2f} TFLOP forward and "
        f"{info64['train_flops_per_sample'] / 1e12:.2f} TFLOP forward+backward per sample at "
        f"64x64 latents ({info128['flops_per_sample'] / 1e12:.2f} / "
        f"{info128['train_flops_per_sample'] / 1e12:.2f} at 128x128).",
    ]
    text = "\n".join(lines)
    if args.no_write:
        print(text)
    else:
        write_section("models", text)
        print("wrote the 'models' section of docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
