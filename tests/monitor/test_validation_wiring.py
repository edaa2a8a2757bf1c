"""build_validator with the real components: the demo's tiny CLIP and pixel encoder, a real
sampler from scaletrain.diffusion, and the tiny U-Net through make_model_fn."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scaletrain.config import load_config
from scaletrain.diffusion import make_model_fn
from scaletrain.models import build_model
from scaletrain.train.monitor.validation_wiring import build_validator

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["eps"])
def test_tiny_unet_validation_grid_from_real_components(tmp_path, objective):
    cfg = load_config(
        ROOT / "configs" / "data" / "demo.yaml",
        [
            f"preprocess.text_encoder.tiny.cache_dir={tmp_path / 'cache'}",
            f"diffusion.objective={objective}",
            "validation.every=2",
            "validation.prompts=[a red circle,a blue square,a green triangle]",
            "validation.steps=2",
            "validation.guidance_scale=3.0",
            "validation.nrow=3",
        ],
    )
    model_cfg = load_config(ROOT / "configs" / "models" / "tiny_unet.yaml").model
    torch.manual_seed(0)
    model = build_model(model_cfg).eval()
    model_fn = make_model_fn(model, "unet")
    calls = []

    def counting_model_fn(x, t, cond):
        calls.append((x.shape[0], set(cond)))
        return model_fn(x, t, cond)

    validator = build_validator(
        cfg.validation, cfg.diffusion, cfg.preprocess, cfg.data, tmp_path,
        latent_shape=(12, 32, 32),
    )
    path = validator.run(2, counting_model_fn)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 + 64 + 2, 2 + 3 * (64 + 2), 3)
    # Guidance runs conditional and unconditional rows in one batched call per step.
    assert calls and all(n == 6 for n, _ in calls)
    assert {"encoder_hidden_states", "pooled", "time_ids"} <= calls[0][1]
    # Same seeds, same weights: the next validation reproduces the grid exactly.
    again = np.asarray(Image.open(validator.run(4, counting_model_fn)))
    np.testing.assert_array_equal(grid, again)
