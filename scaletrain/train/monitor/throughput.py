"""Throughput, model FLOP utilisation (MFU), data-wait fraction, step time and peak memory.

MFU follows PaLM (Chowdhery et al. 2022, App. B): the FLOPs the *model* needs per sample
(forward x 3: the backward pass costs about twice the forward, Kaplan et al. 2020 §2.1),
times samples per second, over the hardware's peak. Activation recomputation is not counted
(that would be hardware FLOP utilisation), so MFU is comparable across memory settings.
Skipped steps (non-finite loss) still count: their forward and backward were computed.

Timing is per window (between two ``summary()`` calls): on CUDA ``summary()`` synchronises
once, so the window's wall time is exact without a synchronisation every step.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager

import torch

# Dense (no sparsity) bf16 tensor-core peak TFLOP/s per device, from the vendors' data
# sheets. Matched as substrings of torch.cuda.get_device_name(), first match wins, so more
# specific names come before the names they contain ("H100 PCIe" before "H100").
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
]


def lookup_peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of the device called ``device_name``, or None if unknown."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def device_peak_tflops(device: torch.device | str, override: float | None = None) -> float | None:
    """``override`` if given, else the table entry of a CUDA device, else None (CPU: no MFU)."""
    if override is not None:
        return float(override)
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return lookup_peak_tflops(torch.cuda.get_device_name(device))
    return None


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory of this process: CUDA max allocated bytes, or (CPU) the max resident set."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class Throughput:
    """Accumulates step timings over a logging window and turns them into metrics.

    Args:
        forward_flops_per_sample: forward-pass FLOPs of one sample at the training resolution
            (scaletrain model-info's ``flops_per_sample``); training counts 3x this.
        world_size: number of data-parallel ranks (devices) sharing the samples.
        device: this rank's device, for the peak table and peak memory.
        peak_tflops: peak TFLOP/s per device; None looks it up (CUDA) or omits MFU (CPU).
        hardware_flops_per_sample: model-info's ``hardware_flops_per_sample`` (forward
            recompute of gradient checkpointing included) for ``perf/hfu``; None: no recompute.

    Loop usage::

        with throughput.waiting_for_data():
            batch = next(loader)
        ... forward, backward, step ...
        throughput.step_done(global_batch_size, skipped=not finite)
        if step % every == 0:
            logger.log(step, {**loss_metrics, **throughput.summary()})
    """

    def __init__(
        self,
        forward_flops_per_sample: float,
        world_size: int,
        device: torch.device | str = "cpu",
        peak_tflops: float | None = None,
        hardware_flops_per_sample: float | None = None,
    ) -> None:
        if forward_flops_per_sample < 0:
            raise ValueError(f"forward_flops_per_sample must be >= 0, got {forward_flops_per_sample}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.train_flops_per_sample = 3.0 * float(forward_flops_per_sample)
        # With gradient checkpointing the device also recomputes the forward: HFU counts it.
        self.hardware_flops_per_sample = (float(hardware_flops_per_sample)
                                          if hardware_flops_per_sample is not None
                                          else self.train_flops_per_sample)
        self.world_size = world_size
        self.device = torch.device(device)
        self.peak_tflops = device_peak_tflops(self.device, peak_tflops)
        self.skipped_steps = 0
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._window_samples = 0
        self._window_data_wait = 0.0

    def start(self) -> None:
        """Restart the window clock (call right before the first step, after set-up)."""
        self._reset_window()

    @contextmanager
    def waiting_for_data(self):
        """Time the block as data wait (fetching the next batch from the loader)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._window_data_wait += time.perf_counter() - t0

    @contextmanager
    def paused(self):
        """Leave the block's time out of the window (evaluation is not training time)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - t0

    def add_data_wait(self, seconds: float) -> None:
        """Add data-wait time measured elsewhere."""
        self._window_data_wait += float(seconds)

    def step_done(self, samples: int, skipped: bool = False) -> None:
        """Record one optimizer step that processed ``samples`` samples over all ranks."""
        self._window_steps += 1
        self._window_samples += int(samples)
        if skipped:
            self.skipped_steps += 1

    def summary(self) -> dict[str, float]:
        """Metrics of the window since the last summary, then start a new window."""
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        out: dict[str, float] = {
            "perf/skipped_steps": float(self.skipped_steps),
            "perf/peak_mem_gib": peak_memory_bytes(self.device) / 2**30,
        }
        if self._window_steps:
            samples_per_s = self._window_samples / elapsed
            tflops = self.train_flops_per_sample * samples_per_s / self.world_size / 1e12
            out.update(
                {
                    "perf/samples_per_s": samples_per_s,
                    "perf/step_time_s": elapsed / self._window_steps,
                    "perf/data_wait_frac": min(self._window_data_wait / elapsed, 1.0),
                    "perf/tflops_per_device": tflops,
                }
            )
            if self.peak_tflops:
                out["perf/mfu"] = tflops / self.peak_tflops
                hardware = tflops * self.hardware_flops_per_sample / max(
                    self.train_flops_per_sample, 1e-30)
                out["perf/hfu"] = hardware / self.peak_tflops
        self._reset_window()
        return out

    def state_dict(self) -> dict[str, int]:
        """What must survive a resume: the skipped-steps counter."""
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_steps = int(state["skipped_steps"])
