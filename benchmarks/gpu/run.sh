#!/usr/bin/env bash
# The one-command GPU check (one H100/H200-class card, < 8 minutes), from a fresh checkout
# after `make install` (which creates .venv):
#
#     benchmarks/gpu/run.sh [OUT_DIR]        # default benchmarks/gpu/results
#
# 1. `pytest -m gpu`: NCCL on one rank, bf16 SDPA on the flash path, the latent draw on the
#    device, fused AdamW, a ZeRO-2 step, train.compile on CUDA.
# 2. benchmarks/gpu/bench_gpu.py: bf16 training-step time, TFLOP/s, MFU and peak memory of
#    mmdit_2b (64x64 latents) and sdxl_unet (128x128 latents), ZeRO-2, eager and compiled;
#    SDXL-VAE encode images/s at 1024x1024. Writes OUT_DIR/gpu_bench.json and .md and the
#    "gpu" section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-benchmarks/gpu/results}"
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "run.sh: $PY not found; run 'make install' first (or set PYTHON)" >&2
    exit 1
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "run.sh: no CUDA device")'
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
mkdir -p "$OUT"
start=$(date +%s)
status=0
# Each part has its own limit, so that one hang cannot eat the whole budget; a failed test
# does not stop the measurements (the exit status reports it).
timeout 150 "$PY" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest_gpu.txt" || status=1
timeout 330 "$PY" benchmarks/gpu/bench_gpu.py --out "$OUT" --steps 10 --warmup 3 2>&1 \
    | tee "$OUT/bench_gpu.log" || status=1
echo "run.sh: done in $(( $(date +%s) - start )) s (exit $status); results in $OUT"
exit $status
