"""Throughput arithmetic (samples/s, TFLOP/s, MFU), the peak table and peak memory."""

import time

import pytest

from scaletrain.train.monitor.throughput import (
    Throughput,
    device_peak_tflops,
    lookup_peak_tflops,
    peak_memory_bytes,
)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Some Unknown Accelerator", None),
    ],
)
def test_peak_table_matches_specific_names_first(name, tflops):
    assert lookup_peak_tflops(name) == tflops


def test_cpu_has_no_peak_unless_configured():
    assert device_peak_tflops("cpu") is None
    assert device_peak_tflops("cpu", override=2.5) == 2.5


def test_summary_arithmetic(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    tp = Throughput(forward_flops_per_sample=1e12, world_size=4, peak_tflops=10.0)
    tp.start()
    with tp.waiting_for_data():
        now[0] += 0.5
    now[0] += 0.5
    tp.step_done(samples=16)
    now[0] += 1.0
    tp.step_done(samples=16, skipped=True)
    out = tp.summary()
    # 32 samples in 2 s -> 16/s; 3 x 1 TFLOP x 16/s over 4 devices = 12 TFLOP/s per device.
    assert out["perf/samples_per_s"] == pytest.approx(16.0)
    assert out["perf/step_time_s"] == pytest.approx(1.0)
    assert out["perf/data_wait_frac"] == pytest.approx(0.25)
    assert out["perf/tflops_per_device"] == pytest.approx(12.0)
    assert out["perf/mfu"] == pytest.approx(1.2)
    assert out["perf/skipped_steps"] == 1.0
    assert out["perf/peak_mem_gib"] > 0


def test_window_resets_but_skipped_counter_persists_through_state_dict():
    tp = Throughput(1e9, world_size=1)
    tp.step_done(8, skipped=True)
    first = tp.summary()
    assert "perf/mfu" not in first  # CPU without a configured peak
    second = tp.summary()
    assert "perf/samples_per_s" not in second  # no steps in this window
    assert second["perf/skipped_steps"] == 1.0
    resumed = Throughput(1e9, world_size=1)
    resumed.load_state_dict(tp.state_dict())
    assert resumed.skipped_steps == 1


def test_peak_memory_cpu_grows_with_allocation():
    import torch

    before = peak_memory_bytes("cpu")
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    after = peak_memory_bytes("cpu")
    assert block.sum().item() == 64 * 2**20
    assert after >= before
    assert after > 64 * 2**20
