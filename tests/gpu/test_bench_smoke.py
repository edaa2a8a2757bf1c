"""benchmarks/gpu/bench_gpu.py --smoke: the GPU benchmark's code runs on the CPU (tiny presets),
so a GPU session does not find it broken; the figures themselves need a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_writes_its_json_and_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu" / "bench_gpu.py"), "--smoke",
         "--compile", "none", "--out", str(tmp_path), "--no-write"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [r["model"] for r in result["steps"]] == ["tiny_mmdit", "tiny_unet"]
    for row in result["steps"]:
        assert "error" not in row, row
        assert row["batch"] == 2 and row["step_s"] > 0 and row["model_tflops"] > 0
    assert result["vae"]["images_per_s"] > 0
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "| tiny_unet | 16x16 | none | 2 |" in table
