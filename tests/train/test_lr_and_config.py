"""LR schedule and engine config validation."""

from __future__ import annotations

import math

import pytest

from scaletrain.config import load_config
from scaletrain.core.config_base import ConfigError
from scaletrain.train.config import TrainConfig
from scaletrain.train.engine import deepspeed_config
from scaletrain.train.lr import lr_at


def test_warmup_then_constant():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, max_steps=10)
    assert [lr_at(cfg, s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(cfg, 9) == 1e-3


def test_warmup_then_cosine_reaches_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=2, max_steps=12, lr_schedule="cosine")
    assert lr_at(cfg, 2) == pytest.approx(1e-3)
    assert lr_at(cfg, 7) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 2)))
    assert lr_at(cfg, 12) == pytest.approx(1e-5)
    values = [lr_at(cfg, s) for s in range(2, 13)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize(
    "override, key",
    [("train.grad_accum=0", "train.grad_accum"), ("train.betas=[0.9]", "train.betas"),
     ("train.zero_stage=4", "train.zero_stage"), ("ema.sigma_rel=0.5", "ema.sigma_rel"),
     ("train.min_lr=1", "train.min_lr"), ("checkpoint.keep_last=0", "checkpoint.keep_last")],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_zero0_requires_bf16():
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(None, ["train.zero_stage=0", "train.bf16=false"])


def test_deepspeed_config_carries_the_fields():
    cfg = TrainConfig(zero_stage=3, grad_accum=2, grad_clip=0.5, betas=[0.8, 0.95],
                      weight_decay=0.1, eps=1e-6)
    ds = deepspeed_config(cfg, micro_batch=4, world_size=2)
    assert ds["train_batch_size"] == 16
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True
    params = ds["optimizer"]["params"]
    assert params["betas"] == [0.8, 0.95] and params["weight_decay"] == 0.1
    assert params["eps"] == 1e-6 and params["torch_adam"] is True
