"""Validation loss on held-out latents: the protocol (fixed samples, timesteps and noise),
the value against a direct computation, and the training loader never reading the held-out
shards."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config import load_config
from scaletrain.core.config_base import ConfigError
from scaletrain.data.loader import build_train_loader
from scaletrain.diffusion import make_model_fn
from scaletrain.eval import EvalSetting, Evaluator
from scaletrain.eval.heldout import HeldOutSet, heldout_source, noise_for
from tests.support.tiny import tiny_root_config, trained_like
from tests.train.test_real_components import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("latents") / "shards", num_shards=3,
                        per_shard=6)


def _cfg(shards, *overrides):
    return tiny_root_config("tiny_unet", [
        f"data.path={shards}", "data.num_workers=0", "data.batch_size=2",
        "data.max_text_tokens=16", "diffusion.objective=flow", "eval.holdout_shards=1",
        "eval.metrics=[loss]", *overrides])


def test_training_loader_never_reads_the_held_out_shards(shards):
    cfg = _cfg(shards)
    loader = build_train_loader(cfg.data, 0, 1, 0, holdout_shards=1)
    assert loader.sources[0].index.num_shards == 2 and loader.samples_per_epoch == 12
    batches = iter(loader)
    keys = [k for _ in range(2 * loader.steps_per_epoch) for k in next(batches)["keys"]]
    loader.close()
    assert {k.split("-")[0] for k in keys} == {"s0", "s1"}  # two epochs, never s2
    held = heldout_source(cfg.eval, cfg.data.path)
    assert [s.name for s in held.shards] == ["000002.tar"]
    with pytest.raises(ConfigError, match="eval.holdout_shards: 3 of the 3 shards"):
        build_train_loader(cfg.data, 0, 1, 0, holdout_shards=3)
    # The config refuses a held-out set named twice, and no held-out set at all when needed.
    with pytest.raises(ConfigError, match="eval.holdout_shards: set eval.data or"):
        load_config(None, [f"eval.data={shards}", "eval.holdout_shards=1"])
    with pytest.raises(ConfigError, match="eval.data: the held-out set is needed"):
        heldout_source(load_config(None).eval, "")


def test_loss_is_the_plain_mse_at_fixed_timesteps_and_noise(shards):
    cfg = _cfg(shards, "eval.timesteps=4", "eval.batch_size=4")
    model = trained_like(cfg.model)
    model_fn = make_model_fn(model, "unet")
    evaluator = Evaluator(cfg.eval, EvalSetting.from_root(cfg))
    result = evaluator.loss(model_fn)
    assert result["loss_samples"] == 6
    assert list(result) == ["loss", "loss_t/0.125", "loss_t/0.375", "loss_t/0.625",
                            "loss_t/0.875", "loss_samples"]
    # Every evaluation measures the same thing: bit-identical on a repeat.
    assert evaluator.loss(model_fn) == result

    # Directly: rectified flow x_t = (1 - t) x0 + t eps, target eps - x0, t * 1000 given to
    # the model, each sample alone (batch of one), the held-out latents as stored.
    heldout = HeldOutSet(heldout_source(cfg.eval, cfg.data.path), cfg.data.max_text_tokens)
    per_t = []
    for k, t in enumerate([0.125, 0.375, 0.625, 0.875]):
        losses = []
        for i in range(6):
            batch = heldout.collate([i])
            x0 = batch["latents"]
            eps = noise_for(i, k, cfg.eval.seed, tuple(x0.shape[1:]))[None]
            x_t = (1 - t) * x0 + t * eps
            cond = {key: batch[key] for key in ("encoder_hidden_states", "pooled", "time_ids")}
            with torch.no_grad():
                pred = model_fn(x_t, torch.full((1,), t * 1000), cond)
            losses.append(float((pred - (eps - x0)).square().mean()))
        per_t.append(sum(losses) / 6)
        assert result[f"loss_t/{t:.3f}"] == pytest.approx(per_t[-1], rel=1e-5)
    assert result["loss"] == pytest.approx(sum(per_t) / 4, rel=1e-5)

    # The batch size only regroups the same computations.
    other = Evaluator(_cfg(shards, "eval.timesteps=4", "eval.batch_size=1").eval,
                      EvalSetting.from_root(cfg)).loss(model_fn)
    assert other["loss"] == pytest.approx(result["loss"], rel=1e-5)
    # Another seed is other noise.
    reseeded = Evaluator(_cfg(shards, "eval.timesteps=4", "eval.seed=1").eval,
                         EvalSetting.from_root(cfg)).loss(model_fn)
    assert reseeded["loss"] != result["loss"]


def test_discrete_objectives_evaluate_at_the_nearest_index(shards):
    cfg = _cfg(shards, "diffusion.objective=eps", "diffusion.schedule=scaled_linear")
    evaluator = Evaluator(cfg.eval, EvalSetting.from_root(cfg))
    points = evaluator.objective.points_at(torch.tensor([0.0, 0.0625, 1.0], dtype=torch.float64))
    assert points.model.tolist() == [0.0, 62.0, 999.0]  # round(t * 999)
    assert torch.allclose(points.a**2 + points.b**2, torch.ones(3, dtype=torch.float64))
    result = evaluator.loss(make_model_fn(trained_like(cfg.model), "unet"))
    assert set(result) >= {"loss", "loss_t/0.062", "loss_t/0.938"}
    assert all(torch.isfinite(torch.tensor(v)) for v in result.values())


def test_start_up_checks_name_the_key(shards, tmp_path):
    """A training run loads Inception and CLIP and checks its inputs before step 1."""
    cases = {
        "eval.inception": [f"eval.inception={tmp_path / 'missing.pth'}", "eval.metrics=[fid]"],
        "eval.clip_model": [f"eval.clip_model={tmp_path / 'no_clip'}", "eval.metrics=[clip]"],
        "eval.prompts": [f"eval.prompts={tmp_path / 'none.txt'}", "eval.metrics=[clip]"],
    }
    for key, overrides in cases.items():
        cfg = _cfg(shards, *overrides)
        with pytest.raises(ConfigError, match=f"^{key}: "):
            Evaluator(cfg.eval, EvalSetting.from_root(cfg)).prepare()
