"""Faithfulness at full size, on the meta device: the presets against diffusers itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from scaletrain.config import load_config
from scaletrain.models import build_model, count_parameters

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"

def _preset(name: str, *overrides: str):
    return load_config(PRESETS / f"{name}.yaml", list(overrides)).model


def _on_meta(cls, **kwargs):
    with torch.device("meta"):
        return cls(**kwargs)


def _shapes(model, skip=()):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in skip}


def test_sdxl_preset_equals_diffusers_sdxl_base(sdxl_base_config):
    ours = build_model(_preset("sdxl_unet"), device="meta")
    ref = _on_meta(UNet2DConditionModel, **sdxl_base_config)
    assert count_parameters(ours) == count_parameters(ref) == 2_567_463_684
    assert _shapes(ours) == _shapes(ref)  # same names, same shapes: export is a key copy


def test_sdxl_with_adagn_equals_diffusers_scale_shift(sdxl_base_config):
    ours = build_model(_preset("sdxl_unet", "model.time_conditioning=scale_shift"), device="meta")
    ref = _on_meta(UNet2DConditionModel, **{**sdxl_base_config, "resnet_time_scale_shift": "scale_shift"})
    assert count_parameters(ours) == count_parameters(ref)
    assert _shapes(ours) == _shapes(ref)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_mmdit_2b_preset_equals_diffusers_sd3_medium(sd3_medium_config, qk_norm):
    ours = build_model(_preset("mmdit_2b", f"model.qk_norm={str(qk_norm).lower()}"), device="meta")
    ref = _on_meta(SD3Transformer2DModel, **sd3_medium_config, qk_norm="rms_norm" if qk_norm else None)
    assert count_parameters(ours) == count_parameters(ref)
    if not qk_norm:  # the released SD3-medium (SD3.5 adds RMS QK-norm)
        assert count_parameters(ours) == 2_028_328_000
    assert _shapes(ours) == _shapes(ref, skip={"pos_embed.pos_embed"})


def test_mmdit_2b_preset_as_shipped_is_the_released_sd3_medium():
    assert count_parameters(build_model(_preset("mmdit_2b"), device="meta")) == 2_028_328_000


def test_mmdit_8b_builds_on_meta_with_sd3_sizing():
    cfg = _preset("mmdit_8b")
    model = build_model(cfg, device="meta")
    assert cfg.depth == 38 and cfg.hidden_size == 64 * 38 and cfg.heads == 38
    assert all(p.is_meta for p in model.parameters())
    assert 7.9e9 < count_parameters(model) < 8.2e9
    assert model.config is cfg
