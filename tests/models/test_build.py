"""build_model: dispatch, meta build, module-by-module materialisation, tiny presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scaletrain.config import load_config
from scaletrain.core.config_base import ConfigError
from scaletrain.models import (
    MMDiT,
    UNet2DConditionModel,
    build_model,
    count_parameters,
    materialize_,
)
from scaletrain.models.inputs import example_inputs

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"


@pytest.mark.parametrize("name, cls", [("tiny_unet", UNet2DConditionModel), ("tiny_mmdit", MMDiT)])
def test_tiny_presets_build_train_and_match_the_demo_shapes(name, cls):
    cfg = load_config(PRESETS / f"{name}.yaml").model
    model = build_model(cfg)
    assert isinstance(model, cls) and model.config is cfg
    assert 2e5 < count_parameters(model) < 5e6
    # The demo: 32x32 "latents" of 12 channels (space-to-depth of 64x64 RGB), 64-wide text.
    assert (cfg.in_channels, cfg.sample_size, cfg.pooled_projection_dim) == (12, 32, 64)
    inputs = example_inputs(cfg, batch_size=2)
    out = model(**inputs)
    assert out.shape == (2, 12, 32, 32)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter is trained
    if cls is MMDiT:  # the last block's text queries are discarded: zero grad, as in SD3
        last = model.transformer_blocks[-1].attn.add_q_proj
        assert torch.equal(last.weight.grad, torch.zeros_like(last.weight))


def test_meta_build_allocates_nothing_and_materialises_like_a_direct_build(mmdit_cfg):
    cfg = mmdit_cfg(layer_scale_init=1e-3, qk_norm=True)
    torch.manual_seed(11)
    direct = build_model(cfg)
    meta = build_model(cfg, device="meta")
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    torch.manual_seed(11)
    materialize_(meta, "cpu")
    assert not any(p.is_meta for p in meta.parameters())
    for (name, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), name  # deterministic, same init rules (zero-init included)
    assert torch.equal(meta.proj_out.weight, torch.zeros_like(meta.proj_out.weight))
    assert torch.equal(meta.transformer_blocks[0].ls_attn.gamma, torch.full((cfg.hidden_size,), 1e-3))


def test_dtype_and_bad_arch(unet_cfg):
    model = build_model(unet_cfg(), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    inputs = example_inputs(model.config, batch_size=1, dtype=torch.bfloat16)
    assert model(**inputs).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="arch"):
        build_model(object())


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.skip_kappa"):
        load_config(PRESETS / "tiny_unet.yaml", ["model.skip_scaling=per_level"])
    with pytest.raises(ConfigError, match="model.transformer_layers_per_block"):
        load_config(PRESETS / "tiny_unet.yaml", ["model.transformer_layers_per_block=[1]"])
    with pytest.raises(ConfigError, match="model.norm"):
        load_config(PRESETS / "tiny_mmdit.yaml", ["model.norm=batchnorm"])
    with pytest.raises(ConfigError, match="model.pos_embed_max_size"):
        load_config(PRESETS / "tiny_mmdit.yaml", ["model.pos_embed_max_size=8"])
