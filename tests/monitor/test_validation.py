"""Validator and PNG grid: fixed seeds give the same images; the grid lands on disk and wandb;
the guidance baseline is what training's prompt dropout fed.

Real components throughout: the demo's tiny CLIP and pixel encoder, the diffusion sampler and
the tiny U-Net / MMDiT (perturbed off their initialisation)."""

import numpy as np
import pytest
import torch
from PIL import Image

from scaletrain.diffusion import make_model_fn
from scaletrain.sample.generate import initial_noise
from scaletrain.sample.image_grid import make_grid, save_image_grid
from scaletrain.train.monitor.metrics_logger import MetricsLogger
from scaletrain.train.monitor.validation import Validator, grid_path
from tests.support.tiny import tiny_root_config, trained_like
from tests.support.wandb_records import offline_run_files, read_wandb_file


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


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_clip_cache")


def _setup(tmp_path, clip_cache, preset="tiny_unet", *overrides, metrics_logger=None, rank=0):
    cfg = tiny_root_config(preset, [
        "model.sample_size=4", "validation.every=5", "validation.steps=2",
        "validation.prompts=[a red circle,a blue square,a green triangle]",
        "diffusion.objective=flow", *overrides], clip_cache)
    model = trained_like(cfg.model)
    calls = []
    model_fn = make_model_fn(model, cfg.model.arch)

    def counting(x, t, cond):
        calls.append({k: v.clone() for k, v in cond.items()})
        return model_fn(x, t, cond)

    validator = Validator(cfg, tmp_path, rank=rank, metrics_logger=metrics_logger)
    return validator, counting, calls


def test_images_depend_on_seed_not_on_batching(tmp_path, clip_cache):
    validator, model_fn, _ = _setup(tmp_path, clip_cache, "tiny_unet",
                                    "validation.batch_size=3")
    images = validator.generate(model_fn)
    assert images.shape == (3, 3, 8, 8)
    torch.testing.assert_close(validator.generate(model_fn), images, rtol=0, atol=0)
    # Each image's initial noise is its own seed's: batch size does not change it.
    torch.testing.assert_close(
        initial_noise([1], (12, 4, 4))[0], initial_noise([0, 1], (12, 4, 4))[1], rtol=0, atol=0
    )
    # With a deterministic sampler, the batch size changes no image (up to batched kernels).
    split, model_fn, _ = _setup(tmp_path, clip_cache, "tiny_unet", "validation.batch_size=1")
    torch.testing.assert_close(split.generate(model_fn), images, rtol=1e-5, atol=1e-5)
    other, model_fn, _ = _setup(tmp_path, clip_cache, "tiny_unet", "validation.seeds=[5,6,7]")
    assert not torch.equal(other.generate(model_fn), images)


@pytest.mark.parametrize("preset", ["tiny_unet", "tiny_mmdit"])
def test_guidance_baseline_is_what_prompt_dropout_fed(tmp_path, clip_cache, preset):
    """cfg_null zeros (the default): the unconditional rows are zeros, not the encoded empty
    prompt; SDXL micro-conditioning goes to the U-Net only."""
    validator, model_fn, calls = _setup(tmp_path, clip_cache, preset,
                                        "validation.guidance_scale=3.0")
    validator.generate(model_fn)
    cond = calls[0]  # guidance batches the conditional and unconditional rows together
    n = len(validator.prompts)
    assert cond["pooled"].shape[0] == 2 * n
    assert not torch.equal(cond["pooled"][:n], torch.zeros_like(cond["pooled"][:n]))
    assert torch.equal(cond["pooled"][n:], torch.zeros_like(cond["pooled"][n:]))
    hidden = cond["encoder_hidden_states"]
    assert torch.equal(hidden[n:], torch.zeros_like(hidden[n:]))
    assert ("time_ids" in cond) == (preset == "tiny_unet")
    # The prompts were encoded once, and the text encoder is gone.
    assert validator.encoders()[0].encoder is None


def test_empty_prompt_baseline_when_training_dropped_to_it(tmp_path, clip_cache):
    validator, model_fn, calls = _setup(tmp_path, clip_cache, "tiny_mmdit",
                                        "validation.guidance_scale=3.0",
                                        "diffusion.cfg_null=empty_prompt")
    validator.generate(model_fn)
    n = len(validator.prompts)
    empty = validator.encoders()[0].text([""])
    torch.testing.assert_close(calls[0]["pooled"][n:], empty["pooled"].expand(n, -1))


def test_run_saves_grid_and_logs_it_to_wandb(tmp_path, clip_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with MetricsLogger(tiny_root_config("tiny_unet").logging, tmp_path, rank=0) as log:
        validator, model_fn, _ = _setup(tmp_path, clip_cache, "tiny_unet",
                                        "validation.nrow=2", metrics_logger=log)
        assert [s for s in range(11) if validator.should_run(s)] == [0, 5, 10]
        path = validator.run(5, model_fn)
        validator.run(10, model_fn)
    assert path == grid_path(tmp_path, 5) and path.name == "step_000000005.png"
    assert Image.open(path).size == (2 + 2 * (8 + 2), 2 + 2 * (8 + 2))
    (wandb_file,) = offline_run_files(tmp_path)
    history = read_wandb_file(wandb_file)["history"]
    logged = [row for row in history if "validation/samples/_type" in row]
    assert [row["_step"] for row in logged] == [5, 10]
    assert "a blue square" in logged[0]["validation/samples/caption"]


def test_other_ranks_sample_but_write_nothing(tmp_path, clip_cache):
    validator, model_fn, calls = _setup(tmp_path, clip_cache, rank=1)
    assert validator.run(5, model_fn) is None
    assert calls  # rank 1 took part (ZeRO-3 gathers need every rank)
    assert not (tmp_path / "validation").exists()
