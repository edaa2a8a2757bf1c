"""Real DeepSpeed over 2 CPU processes (gloo): ZeRO-2/3, EMA, resume, faults, preemption.

All runs use the synthetic toy denoiser (configs/train/synthetic.yaml) so they test the
engine alone; test_real_components.py runs the tiny U-Net and MMDiT.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from scaletrain.config import load_config
from scaletrain.core import run_dir as ck
from scaletrain.export.consolidate import consolidate_ema, consolidate_model
from scaletrain.train.checkpoint import UNIVERSAL_TAG
from scaletrain.train.ema import ema_beta

from .conftest import SYNTHETIC, explain, run_train, start_train

pytestmark = pytest.mark.slow

BATCH = 4  # data.batch_size in configs/train/synthetic.yaml


def _step_dir(run_dir, step):
    return ck.checkpoints_dir(run_dir) / ck.step_dir_name(step)


def _rank_file(ckpt, kind, rank):
    return torch.load(ckpt / ck.rank_file(kind, rank), weights_only=False)


def _state(run_dir, step):
    return json.loads((_step_dir(run_dir, step) / ck.STATE).read_text())


def _assert_ema_matches_unsharded_reference(run_dir, steps, world):
    """Recompute the EMA from the full fp32 weights saved after every step, unsharded."""
    ema_cfg = load_config(SYNTHETIC).ema
    reference = None
    for n in range(1, steps + 1):
        weights = consolidate_model(_step_dir(run_dir, n))
        beta = ema_beta(ema_cfg, n - 1, samples_after=n * world * BATCH,
                        batch_samples=world * BATCH)
        if reference is None:
            reference = {k: v.clone() for k, v in weights.items()}  # EMA starts at init
            assert beta == 0.0  # power schedule: the first update copies the weights
        reference = {k: torch.lerp(reference[k], weights[k], 1.0 - beta) for k in weights}
        sharded = consolidate_ema(_step_dir(run_dir, n))
        assert set(sharded) == set(reference)
        for k in reference:
            torch.testing.assert_close(sharded[k], reference[k], rtol=1e-6, atol=1e-7,
                                       msg=f"EMA of {k} after step {n}")
    # No rank holds the whole EMA: each shard file carries a strict part of the elements.
    total = sum(v.numel() for v in reference.values())
    for path in ck.rank_files(_step_dir(run_dir, steps), "ema"):
        shard = torch.load(path, weights_only=True)
        assert 0 < sum(t.numel() for t in shard["tensors"]) < total
    assert len(ck.rank_files(_step_dir(run_dir, steps), "ema")) == world


def test_zero2_run_writes_complete_checkpoints_and_sharded_ema(zero2_reference_run):
    run_dir = zero2_reference_run
    assert (run_dir / "config.yaml").is_file()
    assert (ck.checkpoints_dir(run_dir) / ck.LATEST).read_text().strip() == "step_000000008"
    state = _state(run_dir, 8)
    assert state["step"] == 8 and state["samples_seen"] == 8 * 2 * BATCH
    assert state["world_size"] == 2 and state["zero_stage"] == 2 and state["ema_updates"] == 8
    for kind in ("ema", "data", "rng"):
        assert len(ck.rank_files(_step_dir(run_dir, 8), kind)) == 2
    _assert_ema_matches_unsharded_reference(run_dir, 8, world=2)


def test_zero3_run_loss_falls_and_ema_matches_reference(tmp_path):
    steps = 24
    proc = run_train(tmp_path, ["train.zero_stage=3", f"train.max_steps={steps}",
                                "train.lr=2e-3", "checkpoint.every=1",
                                "checkpoint.keep_last=100", "logging.every=1"])
    assert proc.returncode == 0, explain(proc)
    state = _state(tmp_path, steps)
    assert state["zero_stage"] == 3 and state["step"] == steps
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == steps
    first, last = sum(losses[:4]) / 4, sum(losses[-6:]) / 6
    assert last < 0.8 * first, f"loss did not fall: {losses}"
    _assert_ema_matches_unsharded_reference(tmp_path, steps, world=2)


def _wait_for(predicate, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("compile_mode,async_save",
                         [("none", False), ("blocks", False), ("none", True)])
def test_sigkill_and_resume_is_bit_exact(zero2_reference_run, tmp_path, compile_mode,
                                         async_save):
    """Also with train.compile=blocks: the resumed processes compile again, to the same
    kernels, and go on exactly as an uninterrupted compiled run (their own reference:
    compiled and eager kernels may round differently). With checkpoint.async_save the kill
    may land while the next checkpoint is written in the background: it has no COMPLETE,
    and the resume takes the one before (the synchronous run is the reference)."""
    run_dir = tmp_path / "run"
    overrides = ["train.max_steps=8", "checkpoint.every=1", "checkpoint.keep_last=100",
                 f"train.compile={compile_mode}", f"checkpoint.async_save={async_save}"]
    reference = zero2_reference_run
    if compile_mode != "none":
        reference = tmp_path / "reference"
        proc = run_train(reference, overrides)
        assert proc.returncode == 0, explain(proc)
    proc = start_train(run_dir, overrides, log_path=tmp_path / "killed.log")
    try:
        reached = _wait_for(lambda: ck.is_complete(_step_dir(run_dir, 3)), 420, proc)
        assert reached, (tmp_path / "killed.log").read_text()[-5000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-step
    finally:
        proc.wait()
    killed_at = ck.find_latest(run_dir)
    assert killed_at is not None and _state(killed_at.parent.parent, 3)["step"] == 3
    for partial in ck.checkpoints_dir(run_dir).glob(ck.TMP_PREFIX + "*"):
        assert not (partial / ck.MARKER).exists(), f"{partial} has its marker"
    assert not ck.is_complete(_step_dir(run_dir, 8)), "killed too late to test resume"

    resumed = run_train(run_dir, overrides)  # the same command resumes
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed from" in resumed.stderr

    ref, out = _step_dir(reference, 8), _step_dir(run_dir, 8)
    assert _state(run_dir, 8)["samples_seen"] == _state(reference, 8)["samples_seen"]
    for consolidate in (consolidate_model, consolidate_ema):
        a, b = consolidate(ref), consolidate(out)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{consolidate.__name__}: {k} differs"
    # The bf16 working weights too, and the data position of every rank.
    module_a = torch.load(ref / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    module_b = torch.load(out / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(module_a[k], module_b[k]) for k in module_a)
    for r in range(2):
        assert _rank_file(ref, "data", r) == _rank_file(out, "data", r)


def test_resume_at_another_world_size(zero2_reference_run, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(_step_dir(zero2_reference_run, 4), _step_dir(run_dir, 4))
    proc = run_train(run_dir, ["train.max_steps=6", "checkpoint.every=1",
                               "checkpoint.keep_last=100"], nproc=1)
    assert proc.returncode == 0, explain(proc)
    assert "world size 2 -> 1" in proc.stderr
    assert (_step_dir(run_dir, 4) / UNIVERSAL_TAG / "zero").is_dir()

    # Data position: 4 steps x 2 ranks x 4, then 2 steps x 1 rank x 4 samples.
    state = _state(run_dir, 6)
    assert state["world_size"] == 1 and state["samples_seen"] == 4 * 8 + 2 * 4
    assert _rank_file(_step_dir(run_dir, 6), "data", 0)["position"] == 40
    # Optimizer state came along: AdamW's step count continues from 4.
    optim = torch.load(next((_step_dir(run_dir, 5) / "ds").glob("*optim_states.pt")),
                       weights_only=False)["optimizer_state_dict"]
    steps = {int(s["step"]) for s in optim["base_optimizer_state"]["state"].values()}
    assert steps == {5}, optim["base_optimizer_state"]["state"].keys()
    # EMA re-sliced from 2 shards to 1 and continued with the right decay.
    ema4, ema5 = consolidate_ema(_step_dir(run_dir, 4)), consolidate_ema(
        _step_dir(run_dir, 5))
    w5 = consolidate_model(_step_dir(run_dir, 5))
    beta = ema_beta(load_config(SYNTHETIC).ema, 4, samples_after=36, batch_samples=4)
    for k in w5:
        torch.testing.assert_close(ema5[k], torch.lerp(ema4[k], w5[k], 1 - beta),
                                   rtol=1e-6, atol=1e-7)


def test_nan_injection_skips_everywhere_then_stops_after_k_in_a_row(tmp_path):
    # 0-based step 2 is poisoned on rank 1 alone; steps 4, 5, 6 in a row hit the limit of 3.
    proc = run_train(tmp_path, ["train.max_steps=10", "checkpoint.every=1",
                                "checkpoint.keep_last=100", "data.synthetic.nan_batches=[2,4,5,6]",
                                "data.synthetic.nan_rank=1", "train.max_consecutive_skips=3"])
    assert proc.returncode == 1, explain(proc)
    assert "consecutive steps had a non-finite loss" in proc.stderr
    assert ck.find_latest(tmp_path).name == "step_000000006"  # the last good one is kept
    assert _state(tmp_path, 3)["skipped_steps"] == 1 and _state(tmp_path, 3)["ema_updates"] == 2
    assert _state(tmp_path, 6)["skipped_steps"] == 3 and _state(tmp_path, 6)["ema_updates"] == 3
    w = {n: consolidate_model(_step_dir(tmp_path, n)) for n in (2, 3, 4, 6)}
    for k in w[2]:
        assert torch.equal(w[2][k], w[3][k]), "a skipped step changed the weights"
        assert torch.equal(w[4][k], w[6][k]), "a skipped step changed the weights"
        assert torch.isfinite(w[6][k]).all()
    assert not all(torch.equal(w[3][k], w[4][k]) for k in w[2])  # good steps do train


def test_sigterm_saves_a_checkpoint_and_exits_requeue(tmp_path):
    proc = start_train(tmp_path, ["train.max_steps=100000", "checkpoint.every=100000",
                                  "logging.every=2"], log_path=tmp_path / "log.txt")
    try:
        metrics = tmp_path / "metrics.jsonl"  # first line written at step 2
        started = _wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, 420, proc)
        assert started, (tmp_path / "log.txt").read_text()[-5000:]
        proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to the ranks
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 75, (tmp_path / "log.txt").read_text()[-5000:]
    latest = ck.find_latest(tmp_path)
    assert latest is not None
    state = json.loads((latest / ck.STATE).read_text())
    assert 2 <= state["step"] < 100000
    assert (ck.checkpoints_dir(tmp_path) / ck.LATEST).read_text().strip() == latest.name


# ----------------------------------------------------------------- damaged checkpoints

OPTIM = "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
DAMAGES = {
    "optimizer missing": (OPTIM, "delete"),
    "optimizer truncated": (OPTIM, "truncate"),
    "optimizer bytes flipped": (OPTIM, "flip"),
    "model missing": ("ds/mp_rank_00_model_states.pt", "delete"),
    "model truncated": ("ds/mp_rank_00_model_states.pt", "truncate"),
    "ema missing": ("ema/rank_00001.pt", "delete"),
    "ema truncated": ("ema/rank_00000.pt", "truncate"),
    "data missing": ("data/rank_00001.pt", "delete"),
    "data truncated": ("data/rank_00000.pt", "truncate"),
    "state.json truncated": (ck.STATE, "truncate"),
}


def _damage(ckpt, rel, how):
    path = ckpt / rel
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # flip bytes in the middle of the file, size unchanged (bit rot)
        data = bytearray(path.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_manifest_names_each_kind_of_damaged_file(zero2_reference_run, tmp_path, damage):
    ckpt = shutil.copytree(_step_dir(zero2_reference_run, 8), tmp_path / "step_000000008")
    manifest = ck.read_manifest(ckpt)
    every = sorted(manifest)
    assert set(every) == set(ck.checkpoint_files(ckpt))  # every file is covered
    assert ck.verify_files(ckpt, manifest, every) == []
    rel, how = DAMAGES[damage]
    _damage(ckpt, rel, how)
    problems = ck.verify_files(ckpt, manifest, every)
    assert len(problems) == 1 and problems[0].startswith(str(ckpt / rel)), problems
    # Each rank checks a disjoint share; together they cover every file.
    assert sorted(ck.share(every, 0, 2) + ck.share(every, 1, 2)) == every


def test_damaged_checkpoints_are_set_aside_and_resume_falls_back_bit_exact(
        zero2_reference_run, tmp_path):
    run = shutil.copytree(zero2_reference_run, tmp_path / "run")
    for step in (1, 2, 3, 4):  # not needed: keeps the copy and the scan small
        shutil.rmtree(_step_dir(run, step))
    _damage(_step_dir(run, 8), OPTIM, "flip")
    _damage(_step_dir(run, 7), ck.STATE, "truncate")
    _damage(_step_dir(run, 6), "ema/rank_00001.pt", "delete")
    proc = run_train(run, ["train.max_steps=8", "checkpoint.every=1", "checkpoint.keep_last=100"])
    assert proc.returncode == 0, explain(proc)
    for step, rel in ((8, OPTIM), (7, ck.STATE), (6, "ema/rank_00001.pt")):
        aside = ck.checkpoints_dir(run) / (ck.step_dir_name(step) + ck.CORRUPT_SUFFIX)
        assert aside.is_dir() and (aside / ck.MARKER).is_file()  # renamed, not deleted
        lines = [ln for ln in proc.stderr.splitlines() if "damaged checkpoint" in ln]
        assert sum(str(_step_dir(run, step) / rel) in ln for ln in lines) == 1, proc.stderr
    assert "resumed from" in proc.stderr and "step_000000005" in proc.stderr
    # Steps 6-8 retrained from step 5 equal the uninterrupted run's, bit for bit.
    ref, got = consolidate_model(_step_dir(zero2_reference_run, 8)), consolidate_model(
        _step_dir(run, 8))
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    ref_ema, got_ema = (consolidate_ema(_step_dir(zero2_reference_run, 8)),
                        consolidate_ema(_step_dir(run, 8)))
    for k in ref_ema:
        assert torch.equal(ref_ema[k], got_ema[k]), k
    assert (ck.checkpoints_dir(run) / ck.LATEST).read_text().strip() == "step_000000008"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: room for two checkpoints of the toy model, not three."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_during_a_save_removes_the_partial_checkpoint_and_says_so(small_disk,
                                                                           async_save):
    """With checkpoint.async_save the write fails in the background threads; the error
    reaches every rank at the next wait() (the next save or the end of training)."""
    run = small_disk / "run"
    proc = run_train(run, ["train.max_steps=6", "checkpoint.every=1", "checkpoint.keep_last=100",
                           f"checkpoint.async_save={async_save}"])
    assert proc.returncode == 1, explain(proc)
    lines = [ln for ln in proc.stderr.splitlines() if "disk full at" in ln]
    assert len(lines) == 1, proc.stderr  # once, from rank 0
    assert re.search(rf"disk full at {re.escape(str(ck.checkpoints_dir(run)))} \(\d+ bytes "
                     "needed", lines[0]), lines[0]
    assert "iostream error" not in proc.stderr
    assert not list(ck.checkpoints_dir(run).glob(ck.TMP_PREFIX + "*"))  # partial save gone
    done = ck.complete_checkpoints(run)
    assert done and all(ck.verify_files(p, ck.read_manifest(p), sorted(ck.read_manifest(p)))
                        == [] for p in done)


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def test_second_training_on_a_run_dir_refuses_and_orphans_die_with_their_launcher(tmp_path):
    first = start_train(tmp_path, ["train.max_steps=100000", "checkpoint.every=100000",
                                   "logging.every=2"], log_path=tmp_path / "log.txt")
    try:
        metrics = tmp_path / "metrics.jsonl"
        started = _wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, 420, first)
        assert started, (tmp_path / "log.txt").read_text()[-5000:]
        ranks = _children(first.pid)
        assert len(ranks) == 2
        second = run_train(tmp_path, ["train.max_steps=2"])
        assert second.returncode == 1, explain(second)
        refusals = [ln for ln in second.stderr.splitlines() if "is in use by another" in ln]
        assert len(refusals) == 1, second.stderr
        # The holder is rank 0 of the first training (the rank that took the lock).
        assert any(f"pid {pid} on" in refusals[0] for pid in ranks), refusals[0]
        # SIGKILL to the launcher alone: the kernel kills its ranks (parent-death signal).
        first.kill()
        first.wait(timeout=30)
        gone = _wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and
                                         "Z" not in _proc_state(p) for p in ranks), 60)
        assert gone, f"ranks {ranks} outlived their launcher"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(first.pid, signal.SIGKILL)
    # The lock went with its holder. Released by the kernel as the last process holding the
    # lock file's descriptor exits, which under load can lag the ranks' own exit by a moment.
    def lock_free():
        try:
            with ck.run_lock(tmp_path):
                return True
        except ck.RunDirBusy:
            return False

    assert _wait_for(lock_free, 60), f"still locked; open by: {_holders(tmp_path / '.lock')}"


def _holders(path):
    """The processes with ``path`` open (a scan of /proc/*/fd), for a failure message."""
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                pid = fd_dir.parent.name
                found.append(f"{pid} ({Path(f'/proc/{pid}/cmdline').read_bytes()[:200]!r})")
    return found or "none"


def _proc_state(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_export_names_a_missing_ema_shard_and_a_pruned_checkpoint(zero2_reference_run, tmp_path):
    from scaletrain.export.writer import ExportError, consolidated_weights, export_checkpoint

    ckpt = shutil.copytree(_step_dir(zero2_reference_run, 8), tmp_path / "step_000000008")
    (ckpt / "ema/rank_00001.pt").unlink()
    with pytest.raises(ExportError) as err:
        export_checkpoint(ckpt, tmp_path / "out", weights="ema")
    assert str(ckpt / "ema/rank_00001.pt") in str(err.value)
    assert "EMA shard missing" in str(err.value) and "--weights raw" not in str(err.value)
    assert not (tmp_path / "out").exists()
    shutil.rmtree(ckpt)  # what a training's pruning does between resolving and reading
    for weights in ("ema", "raw"):
        with pytest.raises(ExportError, match="was pruned") as err:
            consolidated_weights(ckpt, weights)
        assert "--weights raw" not in str(err.value)


def test_lr_spike_stops_the_run_and_the_healthy_checkpoint_survives_pruning(tmp_path):
    common = ["checkpoint.every=1", "checkpoint.keep_last=1"]
    proc = run_train(tmp_path, ["train.max_steps=3", *common])
    assert proc.returncode == 0, explain(proc)
    # The same run continues with the LR spiked to 1e30: the loss of step 4 is still finite
    # (it is computed before the update), the update wrecks the weights.
    proc = run_train(tmp_path, ["train.max_steps=6", "train.lr=1e30", *common])
    assert proc.returncode == 1, explain(proc)
    good = _step_dir(tmp_path, 3)
    lines = [ln for ln in proc.stderr.splitlines() if "wrecked the weights" in ln]
    assert len(lines) == 1 and f"The last healthy checkpoint is kept: {good}" in lines[0], \
        proc.stderr
    assert ck.is_complete(good) and ck.is_healthy(good)  # keep_last=1 did not prune it
    assert _state(tmp_path, 4)["healthy"] is False
    assert ck.newest_healthy(tmp_path) == good
    assert all(torch.isfinite(v).all() for v in consolidate_model(good).values())
