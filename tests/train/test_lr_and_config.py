"""LR schedule and engine config validation."""

from __future__ import annotations

import math

import pytest
import torch

from scaletrain.config import load_config
from scaletrain.core.config_base import ConfigError
from scaletrain.train.config import TrainConfig
from scaletrain.train.engine import build_optimizer, deepspeed_config, use_fused_adam
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
    assert "optimizer" not in ds  # the client optimizer of build_optimizer


def test_optimizer_carries_the_fields_and_is_fused_only_on_cuda():
    cfg = TrainConfig(betas=[0.8, 0.95], weight_decay=0.1, eps=1e-6, lr=2e-3)
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))],
                          fused=use_fused_adam(torch.device("cpu")))
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.1
    assert group["eps"] == 1e-6 and group["lr"] == 2e-3 and not group["fused"]
    assert use_fused_adam(torch.device("cuda", 0)) and not use_fused_adam(torch.device("cpu"))


def test_fused_and_plain_adamw_apply_the_same_update():
    # torch's fused AdamW also runs on CPU: the path chosen on CUDA is checked here.
    cfg = TrainConfig(betas=[0.9, 0.99], weight_decay=0.05, eps=1e-8, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 7, generator=g), torch.randn(7, generator=g)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(4)]
    params = {}
    for fused in (False, True):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt = build_optimizer(cfg, ps, fused=fused)
        assert bool(opt.param_groups[0]["fused"]) is fused
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.clone()
            opt.step()
        params[fused] = [p.detach() for p in ps]
    for a, b in zip(params[False], params[True]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(params[True][0], init[0])
