"""The engine with the real tiny U-Net / MMDiT, objective and loader on real latent shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from scaletrain.config import load_config
from scaletrain.core import run_dir as ck
from scaletrain.export.consolidate import consolidate_ema, consolidate_model
from scaletrain.export.writer import export_checkpoint
from scaletrain.models import build_model
from scaletrain.sample.pipeline import sample_images
from tests.support.latent_shards import write_shards

from .conftest import REPO, explain, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("latents") / "shards")


def _overrides(shards, stage, steps):
    return [f"data.path={shards}", "data.batch_size=2", "data.num_workers=0",
            "data.max_text_tokens=16", f"train.zero_stage={stage}", f"train.max_steps={steps}",
            "train.lr=1e-3", "checkpoint.every=2", "logging.every=1",
            "logging.wandb_mode=disabled", "logging.diagnostics_every=2", "ema.schedule=power",
            "ema.sigma_rel=0.1"]


@pytest.mark.parametrize("config, stage", [("train/demo.yaml", 2), ("models/tiny_mmdit.yaml", 3)])
def test_tiny_model_trains_two_ranks(shards, tmp_path, config, stage):
    """The demo preset (tiny U-Net, ZeRO-2, with validation samples from the sharded EMA)
    and the tiny MMDiT under ZeRO-3 (built partitioned)."""
    config = REPO / "configs" / config
    steps = 4
    overrides = _overrides(shards, stage, steps)
    validate = stage == 2
    if validate:
        overrides += ["validation.every=2", "validation.steps=2",
                      "validation.prompts=[a red square,a blue circle]", "validation.nrow=2",
                      "validation.guidance_scale=2.0"]
    proc = run_train(tmp_path, overrides, config=config)
    assert proc.returncode == 0, explain(proc)
    if validate:
        grids = sorted((tmp_path / "validation").glob("step_*.png"))
        assert [g.name for g in grids] == ["step_000000002.png", "step_000000004.png"]
        assert Image.open(grids[-1]).size[0] >= 2 * 64
    state = json.loads((ck.find_latest(tmp_path) / ck.STATE).read_text())
    assert state["step"] == steps and state["zero_stage"] == stage
    assert state["samples_seen"] == steps * 2 * 2

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]  # the others record validation images
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert any(k.startswith("loss_t/") for k in rows[-1])
    assert any(k.startswith("diag/") for k in rows[1]), sorted(rows[1])  # diagnostics at step 2

    # Export-facing consolidation: the model's own parameter names and shapes, full size.
    reference = dict(build_model(load_config(config).model, device="meta").named_parameters())
    for consolidate in (consolidate_model, consolidate_ema):
        weights = consolidate(tmp_path)
        assert set(weights) == set(reference)
        for name, tensor in weights.items():
            assert tensor.shape == reference[name].shape and tensor.dtype == torch.float32
            assert torch.isfinite(tensor).all()


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("config, compile_mode, checkpointing", [
    ("models/tiny_mmdit.yaml", "blocks", True),
    ("train/demo.yaml", "blocks", False),
    # The whole forward as one graph: on the toy model, whose compile takes seconds (the
    # tiny MMDiT's took over 10 minutes on 2 shared cores).
    ("train/synthetic.yaml", "model", False),
])
def test_compiled_run_follows_eager_for_the_first_steps(shards, tmp_path, config, compile_mode,
                                                        checkpointing):
    """train.compile changes kernels, not maths: the losses of the first steps (fp32, one
    rank) agree with the eager run's to float rounding, with gradient checkpointing too."""
    if config == "train/synthetic.yaml":
        overrides = ["train.max_steps=3", "logging.every=1"]
    else:
        overrides = _overrides(shards, 2, 3) + [f"model.gradient_checkpointing={checkpointing}"]
    losses = {}
    for mode in ("none", compile_mode):
        proc = run_train(tmp_path / mode, overrides + ["train.bf16=false",
                                                       f"train.compile={mode}"],
                         nproc=1, config=REPO / "configs" / config)
        assert proc.returncode == 0, explain(proc)
        losses[mode] = _losses(tmp_path / mode)
    assert len(losses["none"]) == 3
    np.testing.assert_allclose(losses[compile_mode], losses["none"], rtol=1e-4)
    assert "recompile_limit" not in proc.stderr  # every call ran compiled, none fell back


def test_demo_sigkill_and_resume_is_bit_exact_with_real_loader(shards, tmp_path):
    """The real loader, objective (noise, timesteps, CFG dropout) and U-Net resume exactly."""
    import os
    import signal
    import time

    from .conftest import start_train

    config = REPO / "configs" / "train" / "demo.yaml"
    overrides = _overrides(shards, 2, 6) + ["checkpoint.every=1", "checkpoint.keep_last=10",
                                            "logging.diagnostics_every=0"]
    reference = run_train(tmp_path / "reference", overrides, config=config)
    assert reference.returncode == 0, explain(reference)

    run_dir = tmp_path / "killed"
    proc = start_train(run_dir, overrides, config=config, log_path=tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 420
        target = ck.checkpoints_dir(run_dir) / ck.step_dir_name(2)
        while not ck.is_complete(target) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ck.is_complete(target), (tmp_path / "killed.log").read_text()[-4000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not ck.is_complete(ck.checkpoints_dir(run_dir) / ck.step_dir_name(6))
    resumed = run_train(run_dir, overrides, config=config)
    assert resumed.returncode == 0, explain(resumed)

    for consolidate in (consolidate_model, consolidate_ema):
        a, b = consolidate(tmp_path / "reference"), consolidate(run_dir)
        assert all(torch.equal(a[k], b[k]) for k in a), consolidate.__name__


# What dependencies printed on the console of a run before issue 15: transformers' bar at
# every load of the text encoder (each validation), DeepSpeed's universal conversion (prints
# and bars) and its per-rank MPU warning on a resume at another world size.
DEPENDENCY_NOISE = ("Loading weights", "Loading checkpoint shards", "it/s]",
                    "Convert DeepSpeed Checkpoint", "Extracting ZeRO fragments",
                    "Processing zero checkpoint", "MPU is not provided", "Retrying in")


def test_demo_resumes_on_one_rank_with_gradient_accumulation(shards, tmp_path, monkeypatch):
    """2 ranks -> 1 rank: universal checkpoint, merged loader states, re-sliced EMA. The
    console of both jobs (with a validation) has our lines only: no dependency's bars."""
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_VERBOSITY", "SCALETRAIN_SHOW_WARNINGS"):
        monkeypatch.delenv(name, raising=False)  # quiet by default, not by the test's setup
    config = REPO / "configs" / "train" / "demo.yaml"
    first = run_train(tmp_path, _overrides(shards, 2, 2) + [
        "validation.every=2", "validation.steps=1", "validation.prompts=[a red square]"],
        config=config)
    assert first.returncode == 0, explain(first)
    assert (tmp_path / "validation" / "step_000000002.png").is_file()
    second = run_train(tmp_path, _overrides(shards, 2, 3) + ["train.grad_accum=2"], nproc=1,
                       config=config)
    assert second.returncode == 0, explain(second)
    assert "world size 2 -> 1" in second.stderr
    for proc in (first, second):
        console = proc.stdout + proc.stderr
        assert not [n for n in DEPENDENCY_NOISE if n in console], explain(proc)
    state = json.loads((ck.find_latest(tmp_path) / ck.STATE).read_text())
    # 2 steps x 2 ranks x 2 samples, then 1 step x 1 rank x 2 micro-batches x 2 samples.
    assert state["step"] == 3 and state["samples_seen"] == 12 and state["world_size"] == 1
    assert state["ema_updates"] == 3


def test_validation_images_equal_scaletrain_sample_of_the_ema_export(shards, tmp_path):
    """One sampling path: the validation grid of step N and `scaletrain sample` on the EMA
    export of step N (same prompts, seeds, sampler, steps, guidance; fp32 on CPU) are the
    same pixels."""
    prompts, seeds = ["a red circle", "a blue square"], [3, 7]
    cache = tmp_path / "clip_cache"
    overrides = _overrides(shards, 2, 2) + [
        "train.bf16=false", "validation.every=2", "validation.steps=3",
        "validation.sampler=euler", "validation.guidance_scale=2.0", "validation.batch_size=1",
        f"validation.prompts=[{','.join(prompts)}]", f"validation.seeds={seeds}",
        "validation.nrow=2", f"preprocess.text_encoder.tiny.cache_dir={cache}"]
    run = tmp_path / "run"
    proc = run_train(run, overrides, config=REPO / "configs" / "train" / "demo.yaml")
    assert proc.returncode == 0, explain(proc)
    grid = np.asarray(Image.open(run / "validation" / "step_000000002.png"))

    export_checkpoint(run, tmp_path / "export", weights="ema", dtype="fp32")
    side = 32 * 2  # the model's sample_size (demo preset), pixel encoder factor 2
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        out = tmp_path / f"sample{i}"
        (record,) = sample_images(tmp_path / "export", [prompt], steps=3, cfg_scale=2.0,
                                  seed=seed, out_dir=out, sampler="euler", batch_size=1,
                                  device="cpu")
        sampled = np.asarray(Image.open(out / record["file"]))
        top, left = 2, 2 + i * (side + 2)  # the grid's cell of image i (padding 2, one row)
        np.testing.assert_array_equal(grid[top:top + side, left:left + side], sampled)


def test_loader_counters_are_summed_over_ranks(tmp_path_factory, tmp_path):
    """A bad shard read by rank 1 only: its lost samples reach the logged metrics (issue 14;
    they used to show rank 0's counters alone, lost_samples=0)."""
    from scaletrain.data.loader.plan import shards_for_slot

    root = write_shards(tmp_path_factory.mktemp("latents_bad") / "shards")
    (rank1_shard,) = shards_for_slot(0, 0, 2, 2, 1, 1, 0)  # seed 0, epoch 0, rank 1
    path = root / f"{rank1_shard:06d}.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    steps = 6
    overrides = [o for o in _overrides(root, 2, steps) if not o.startswith("checkpoint.every")]
    proc = run_train(tmp_path, [*overrides, f"checkpoint.every={steps}"],
                     config=REPO / "configs" / "train" / "demo.yaml")
    assert proc.returncode == 0, explain(proc)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert last["step"] == steps
    ckpt = ck.find_latest(tmp_path)
    per_rank = [torch.load(f, weights_only=False) for f in ck.rank_files(ckpt, "data")]
    lost = [s["metrics"]["lost_samples"] for s in per_rank]
    assert lost[1] > 0  # rank 1 met the bad shard
    for key in ("lost_samples", "failed_shards", "bad_samples"):
        assert last[f"data/{key}"] == sum(s["metrics"][key] for s in per_rank), key


def _stop_with_signal(run_dir, overrides, config, sig, *, after_step: bool, log):
    """Start a job in its own process group and send ``sig`` to the whole group (as SLURM's
    preemption, scancel or a terminal's Ctrl-C do): after the first logged step, or as
    soon as the ranks exist (they are still importing torch). Returns (status, log text)."""
    import os
    import subprocess
    import time

    from .conftest import start_train

    proc = start_train(run_dir, overrides, config=config, log_path=log)
    try:
        if after_step:
            metrics = run_dir / "metrics.jsonl"
            deadline = time.monotonic() + 420
            while not (metrics.is_file() and metrics.stat().st_size > 0):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.05)
        else:
            def ranks():
                return subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)],
                                      capture_output=True, text=True).stdout.split()
            deadline = time.monotonic() + 120
            while len(ranks()) < 2:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            time.sleep(0.5)
        os.killpg(proc.pid, sig)
        code = proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    return code, log.read_text()


@pytest.mark.parametrize("sig, after_step", [("SIGTERM", True), ("SIGINT", True),
                                             ("SIGTERM", False)])
def test_stop_signal_to_the_whole_job_saves_and_exits_requeue(shards, tmp_path, sig, after_step):
    """DataLoader workers (data.num_workers=1) get the signal too and must leave it to the
    trainer; a signal during start-up (before torch is imported) is honoured as well."""
    import signal

    config = REPO / "configs" / "train" / "demo.yaml"
    overrides = [*_overrides(shards, 2, 100000), "data.num_workers=1", "checkpoint.every=100000",
                 "logging.diagnostics_every=0", "validation.every=0"]
    code, log = _stop_with_signal(tmp_path / "run", overrides, config, getattr(signal, sig),
                                  after_step=after_step, log=tmp_path / "log.txt")
    assert code == 75, log[-5000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-5000:]
    latest = ck.find_latest(tmp_path / "run")
    assert latest is not None, log[-5000:]
    assert ck.read_state(latest)["step"] >= 1
