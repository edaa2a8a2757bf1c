"""Validator and PNG grid: fixed seeds give the same images; the grid lands on disk and wandb."""

import numpy as np
import pytest
import torch
from PIL import Image

from scaletrain.train.monitor.config import LoggingConfig, ValidationConfig
from scaletrain.train.monitor.image_grid import make_grid, save_image_grid
from scaletrain.train.monitor.metrics_logger import MetricsLogger
from scaletrain.train.monitor.validation import Validator, grid_path, initial_noise
from scaletrain.train.monitor.wandb_records import offline_run_files, read_wandb_file


def test_grid_layout_and_value_mapping(tmp_path):
    images = torch.stack([torch.full((3, 4, 6), v) for v in (-1.0, 0.0, 1.0)])
    grid = make_grid(images, nrow=2, padding=1)
    assert grid.shape == (1 + 2 * 5, 1 + 2 * 7, 3)
    assert grid[1, 1].tolist() == [0, 0, 0]  # -1 -> 0
    assert grid[1, 8].tolist() == [128, 128, 128]  # 0 -> 127.5, rounded to even
    assert grid[6, 1].tolist() == [255, 255, 255]  # 1 -> 255
    assert grid[6, 8].tolist() == [0, 0, 0]  # empty cell stays padding
    path = save_image_grid(images, tmp_path / "g.png", nrow=2, padding=1)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)


def test_grid_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\[N, 1 or 3, H, W\]"):
        make_grid(torch.zeros(2, 4, 8, 8), nrow=2)


def _pixel_decode(latents):
    # The demo's pixel "encoder": depth-to-space of 12 channels -> 3 x (2h) x (2w).
    return torch.nn.functional.pixel_shuffle(latents, 2).tanh()


def _encode(prompts):
    # Deterministic toy text conditioning: one vector per prompt.
    return {"pooled": torch.tensor([[float(len(p)), 1.0] for p in prompts])}


def _euler_sample(model_fn, noise, cond, uncond, generator, steps=4, guidance=2.0):
    x = noise
    for i in range(steps):
        t = torch.full((x.shape[0],), 1.0 - i / steps)
        v = model_fn(x, t, cond)
        if uncond is not None:
            v = model_fn(x, t, uncond) + guidance * (v - model_fn(x, t, uncond))
        x = x - v / steps
    # A stochastic sampler would draw from `generator` here; this one is an ODE solver.
    return x


def _model_fn(x, t, cond):
    return 0.5 * x + cond["pooled"][:, :1, None, None] * 0.01 * t[:, None, None, None]


def _validator(tmp_path, cfg, metrics_logger=None, rank=0):
    return Validator(
        cfg,
        tmp_path,
        latent_shape=(12, 4, 4),
        encode_prompts=_encode,
        sample=_euler_sample,
        decode=_pixel_decode,
        rank=rank,
        metrics_logger=metrics_logger,
    )


def test_images_depend_on_seed_not_on_batching(tmp_path):
    prompts = ["a", "bb", "ccc"]
    cfg_one = ValidationConfig(every=10, prompts=prompts, batch_size=3)
    cfg_split = ValidationConfig(every=10, prompts=prompts, batch_size=1)
    images = _validator(tmp_path, cfg_one).generate(_model_fn)
    assert images.shape == (3, 3, 8, 8)
    again = _validator(tmp_path, cfg_one).generate(_model_fn)
    torch.testing.assert_close(images, again, rtol=0, atol=0)
    # Each image's initial noise is its own seed's: batch size does not change it.
    torch.testing.assert_close(
        initial_noise([1], (12, 4, 4))[0], initial_noise([0, 1], (12, 4, 4))[1], rtol=0, atol=0
    )
    # With a deterministic sampler, the batch size changes no image.
    split = _validator(tmp_path, cfg_split).generate(_model_fn)
    torch.testing.assert_close(images, split, rtol=0, atol=0)
    other_seeds = ValidationConfig(every=10, prompts=prompts, seeds=[5, 6, 7], batch_size=3)
    assert not torch.equal(_validator(tmp_path, other_seeds).generate(_model_fn), images)


def test_run_saves_grid_and_logs_it_to_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = ValidationConfig(every=5, prompts=["a cat", "a dog"], nrow=2, guidance_scale=1.0)
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return _encode(prompts)

    with MetricsLogger(LoggingConfig(), tmp_path, rank=0) as log:
        validator = Validator(
            cfg, tmp_path, latent_shape=(12, 4, 4), encode_prompts=encode,
            sample=_euler_sample, decode=_pixel_decode, metrics_logger=log,
        )
        assert [s for s in range(11) if validator.should_run(s)] == [0, 5, 10]
        path = validator.run(5, _model_fn)
        validator.run(10, _model_fn)
    assert calls == [["a cat", "a dog"]]  # encoded once, no uncond with guidance 1.0
    assert path == grid_path(tmp_path, 5) and path.name == "step_000000005.png"
    assert Image.open(path).size == (2 + 2 * (8 + 2), 2 + 1 * (8 + 2))
    (wandb_file,) = offline_run_files(tmp_path)
    history = read_wandb_file(wandb_file)["history"]
    logged = [row for row in history if "validation/samples/_type" in row]
    assert [row["_step"] for row in logged] == [5, 10]
    assert "a dog" in logged[0]["validation/samples/caption"]


def test_other_ranks_sample_but_write_nothing(tmp_path):
    cfg = ValidationConfig(every=1, prompts=["x"])
    seen = []

    def model_fn(x, t, cond):
        seen.append(x.shape[0])
        return _model_fn(x, t, cond)

    assert _validator(tmp_path, cfg, rank=1).run(1, model_fn) is None
    assert seen  # rank 1 took part (ZeRO-3 gathers need every rank)
    assert not (tmp_path / "validation").exists()
