"""The exporter's helpers: diffusers config, folded state dict, unsupported options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from scaletrain.config import load_config
from scaletrain.models import build_model
from scaletrain.models.diffusers_compat import (
    diffusers_class_name,
    diffusers_config,
    to_diffusers_state_dict,
    unsupported_options,
)
from scaletrain.models.inputs import example_inputs

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"


def test_sdxl_preset_gives_sdxl_base_config(sdxl_base_config):
    got = diffusers_config(load_config(PRESETS / "sdxl_unet.yaml").model)
    shared = set(got) & set(sdxl_base_config)
    assert len(shared) >= 20
    assert {k: got[k] for k in shared} == {k: sdxl_base_config[k] for k in shared}


def test_unet_weights_load_into_diffusers_and_give_the_same_output(unet_cfg):
    cfg = unet_cfg(time_conditioning="scale_shift")
    assert diffusers_class_name(cfg) == "UNet2DConditionModel" and not unsupported_options(cfg)
    ours = build_model(cfg).eval()
    ref = UNet2DConditionModel(**diffusers_config(cfg)).eval()
    ref.load_state_dict(to_diffusers_state_dict(ours.state_dict(), cfg), strict=True)
    inputs = example_inputs(cfg, batch_size=2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs), ref(**inputs).sample, atol=1e-5, rtol=1e-4)


def test_mmdit_residual_scale_and_layerscale_fold_into_diffusers_weights(mmdit_cfg):
    cfg = mmdit_cfg(adaln_zero=False, residual_scale=0.5, layer_scale_init=0.1, qk_norm=True)
    ours = build_model(cfg).eval()
    with torch.no_grad():  # make LayerScale non-uniform so the fold is per channel
        for name, p in ours.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.05, 0.3)
    ref = SD3Transformer2DModel(**diffusers_config(cfg)).eval()
    missing, unexpected = ref.load_state_dict(to_diffusers_state_dict(ours.state_dict(), cfg), strict=False)
    assert missing == ["pos_embed.pos_embed"] and unexpected == []  # diffusers' buffer
    inputs = example_inputs(cfg, batch_size=2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs), ref(**inputs).sample, atol=2e-5, rtol=1e-4)


def test_options_diffusers_cannot_express_are_refused(unet_cfg, mmdit_cfg):
    for cfg in (unet_cfg(skip_scaling="constant"), mmdit_cfg(mlp="swiglu"), mmdit_cfg(norm="rmsnorm")):
        assert unsupported_options(cfg)
        with pytest.raises(ValueError, match="not expressible"):
            to_diffusers_state_dict(build_model(cfg, device="meta").state_dict(), cfg)
