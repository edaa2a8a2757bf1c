"""checkpoint.async_save (issue 17): the checkpoint is copied to host memory in save() and
written by a thread per rank while training goes on; the files and their bytes are those of
a synchronous save. Real DeepSpeed over 2 gloo processes, the tiny MMDiT and the toy
denoiser. The kill and disk-full cases run with async_save in test_multiprocess.py, the
order of the writes (COMPLETE last) in test_durability.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scaletrain.config import load_config
from scaletrain.core import run_dir as ck
from scaletrain.core.dist_env import free_port
from scaletrain.export.consolidate import consolidate_ema, consolidate_model

from .conftest import REPO, explain, run_train

pytestmark = pytest.mark.slow

MODEL = REPO / "configs" / "models" / "tiny_mmdit.yaml"
WORLD = 2


def _in_flight_worker(rank: int, run_dir: str, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                       "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    from scaletrain.core.dist_env import dist_env_from_environ
    from scaletrain.models.inputs import example_inputs
    from scaletrain.train.checkpoint import (
        PARTS,
        CheckpointManager,
        PerRank,
        Staged,
        StagingEngine,
        TrainState,
    )
    from scaletrain.train.config import CheckpointConfig, EMAConfig
    from scaletrain.train.ema import ShardedEMA, master_weight_fragments
    from scaletrain.train.engine import build_engine, init_distributed

    cfg = load_config(MODEL, ["train.zero_stage=2", "train.bf16=true", "train.lr=1e-2"])
    device = init_distributed(cfg.train, dist_env_from_environ())
    engine = build_engine(cfg.train, cfg.model, 1, WORLD, 0, device)
    inputs = example_inputs(cfg.model, batch_size=1, dtype=torch.bfloat16,
                            generator=torch.Generator().manual_seed(rank))
    ema = ShardedEMA(EMAConfig(), master_weight_fragments(engine.module.named_parameters(),
                                                          rank, WORLD))
    state = TrainState()

    def train_step() -> None:
        # minus 1: the MMDiT's output layer starts at zero, so a plain square has no gradient
        engine.backward((engine(**inputs).float() - 1).square().mean())
        engine.step()
        state.step += 1
        state.samples_seen += WORLD
        ema.update(state.samples_seen, WORLD)

    def snapshot() -> tuple[dict, list]:
        module = {k: v.clone() for k, v in engine.module.state_dict().items()}
        return module, [t.clone() for t in engine.optimizer.single_partition_of_fp32_groups]

    train_step()
    tmp = Path(run_dir) / f"staging_{rank}"
    tmp.mkdir()

    # 1. The staging engine's records are copies: a later step leaves them as they were.
    module0, master0 = snapshot()
    staging = StagingEngine(engine.checkpoint_engine,
                            Staged(tmp, state.step, host_copies={}))
    engine.checkpoint_engine = staging
    try:
        engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    finally:
        engine.checkpoint_engine = staging.inner
    assert not staging.preserves_storage_sharing()  # no second clone inside DeepSpeed
    assert not list(tmp.rglob("*.pt")), "the staging engine wrote files"
    train_step()
    module1, master1 = snapshot()
    assert not all(torch.equal(module0[k], module1[k]) for k in module0), "step changed nothing"
    assert not all(torch.equal(a, b) for a, b in zip(master0, master1))
    staged = {os.path.basename(path): write.args[0] for path, write in staging.staged.pending}
    optim = next(sd for name, sd in staged.items() if name.endswith("optim_states.pt"))
    got = optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    assert all(torch.equal(a, b) for a, b in zip(got, master0)), "staged master weights moved"
    if rank == 0:
        module = staged["mp_rank_00_model_states.pt"]["module"]
        for k in module0:
            assert module[k].dtype == module0[k].dtype and module[k].device.type == "cpu"
            assert torch.equal(module[k], module0[k]), f"staged {k} moved with training"

    # 2. A save in flight while training goes on three more steps: the checkpoint holds the
    # save step's weights, EMA and counters, its files match the manifest, and nothing of
    # the background write (parts, temporary directory) remains.
    manager = CheckpointManager(
        CheckpointConfig(every=1, keep_last=5, async_save=True), run_dir, rank=rank,
        world_size=WORLD, zero_stage=2, engine=engine, train_state=state,
        per_rank={"ema": PerRank(ema.state_dict, ema.load_state_dict, ema.load_shards)},
        run_info=lambda: {}, config_yaml="model: {}\n")
    module_at_save, master_at_save = snapshot()
    ema_at_save = ema.state_dict()  # cloned by ShardedEMA
    saved_step = state.step
    final = manager.save()
    for _ in range(3):
        train_step()
    manager.wait()
    assert ck.is_complete(final)
    if rank == 0:
        assert ck.read_state(final)["step"] == saved_step
        manifest = ck.read_manifest(final)
        assert sorted(manifest) == ck.checkpoint_files(final)
        assert ck.verify_files(final, manifest, sorted(manifest)) == []
        assert not (final / PARTS).exists()
        assert not list(ck.checkpoints_dir(run_dir).glob(ck.TMP_PREFIX + "*"))
        module = torch.load(final / "ds" / "mp_rank_00_model_states.pt",
                            weights_only=False)["module"]
        live = engine.module.state_dict()
        for k in module_at_save:
            assert torch.equal(module[k], module_at_save[k]), f"{k}: not the save step's"
        assert not all(torch.equal(module[k], live[k]) for k in module)
    optim = torch.load(next((final / "ds").glob(f"*pp_rank_{rank}_*optim_states.pt")),
                       weights_only=False)["optimizer_state_dict"]
    assert all(torch.equal(a, b) for a, b in
               zip(optim["single_partition_of_fp32_groups"], master_at_save))
    saved_ema = torch.load(final / ck.rank_file("ema", rank), weights_only=False)
    assert saved_ema["updates"] == ema_at_save["updates"] < ema.updates
    for a, b in zip(saved_ema["tensors"], ema_at_save["tensors"], strict=True):
        assert torch.equal(a, b), "EMA shard is not the save step's"

    # 3. The next save refills the same host buffers in place (no new allocation of the
    # checkpoint's size) with the state of its own step.
    buffers = {k: [t.data_ptr() for t in _tensors(v)] for k, v in manager._host_copies.items()}
    assert any(k.endswith("optim_states.pt") for k in buffers) and ck.rank_file("ema", rank) in buffers
    _, master_now = snapshot()
    final = manager.save()
    manager.wait()
    assert {k: [t.data_ptr() for t in _tensors(v)]
            for k, v in manager._host_copies.items()} == buffers
    optim = torch.load(next((final / "ds").glob(f"*pp_rank_{rank}_*optim_states.pt")),
                       weights_only=False)["optimizer_state_dict"]
    assert all(torch.equal(a, b) for a, b in
               zip(optim["single_partition_of_fp32_groups"], master_now))
    assert not all(torch.equal(a, b) for a, b in zip(master_now, master_at_save))
    dist.barrier()
    dist.destroy_process_group()


def _tensors(item) -> list[torch.Tensor]:
    if torch.is_tensor(item):
        return [item]
    if isinstance(item, dict):
        item = list(item.values())
    if isinstance(item, (list, tuple)):
        return [t for v in item for t in _tensors(v)]
    return []


def test_a_save_in_flight_holds_the_save_steps_state(tmp_path):
    mp.spawn(_in_flight_worker, args=(str(tmp_path), free_port()), nprocs=WORLD)


def test_async_run_resumed_is_bit_exact_with_a_sync_run(zero2_reference_run, tmp_path):
    """Stopped after 4 steps and resumed to 8, saving asynchronously after every step: the
    step-8 checkpoint equals the uninterrupted synchronous run's, byte for byte in every
    tensor, and every checkpoint verifies against its manifest."""
    run_dir = tmp_path / "run"
    overrides = ["checkpoint.every=1", "checkpoint.keep_last=100", "checkpoint.async_save=true"]
    for steps in (4, 8):
        proc = run_train(run_dir, [f"train.max_steps={steps}", *overrides])
        assert proc.returncode == 0, explain(proc)
    assert "resumed from" in proc.stderr
    done = ck.complete_checkpoints(run_dir)
    assert [ck.checkpoint_step(p) for p in done] == list(range(1, 9))
    for ckpt in done:
        manifest = ck.read_manifest(ckpt)
        assert sorted(manifest) == ck.checkpoint_files(ckpt)
        assert ck.verify_files(ckpt, manifest, sorted(manifest)) == []
    assert not list(ck.checkpoints_dir(run_dir).glob(ck.TMP_PREFIX + "*"))
    ref, out = ck.checkpoints_dir(zero2_reference_run), ck.checkpoints_dir(run_dir)
    for step in (4, 8):
        a_dir, b_dir = ref / ck.step_dir_name(step), out / ck.step_dir_name(step)
        assert sorted(ck.read_manifest(a_dir)) == sorted(ck.read_manifest(b_dir))
        for consolidate in (consolidate_model, consolidate_ema):
            a, b = consolidate(a_dir), consolidate(b_dir)
            assert set(a) == set(b)
            for k in a:
                assert torch.equal(a[k], b[k]), f"step {step} {consolidate.__name__}: {k}"
        for r in range(2):
            for kind in ("data", "ema"):
                pa = torch.load(a_dir / ck.rank_file(kind, r), weights_only=False)
                pb = torch.load(b_dir / ck.rank_file(kind, r), weights_only=False)
                assert repr(pa) == repr(pb), f"step {step}: {kind} of rank {r}"
