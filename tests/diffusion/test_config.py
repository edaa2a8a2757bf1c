"""DiffusionConfig validation: every bad value names its key."""

from __future__ import annotations

import pytest

from scaletrain.config import load_config
from scaletrain.core.config_base import ConfigError
from scaletrain.diffusion import DiffusionConfig


def test_defaults_are_valid_sd_eps_with_ddim():
    cfg = DiffusionConfig()
    assert cfg.objective == "eps" and cfg.schedule == "scaled_linear"
    assert (cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == (0.00085, 0.012, 1000)
    assert cfg.resolved_sampler == "ddim"
    assert DiffusionConfig(objective="flow").resolved_sampler == "euler"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(num_train_timesteps=1), "num_train_timesteps"),
        (dict(objective="edm"), "objective"),
        (dict(schedule="quadratic"), "schedule"),
        (dict(timestep_sampling="beta"), "timestep_sampling"),
        (dict(timestep_spacing="random"), "timestep_spacing"),
        (dict(beta_start=0.02, beta_end=0.01), "beta_start"),
        (dict(beta_start=0.0), "beta_start"),
        (dict(cosine_offset=-0.1), "cosine_offset"),
        (dict(zero_terminal_snr=True), "zero_terminal_snr"),  # eps cannot do zero SNR
        (dict(objective="flow", zero_terminal_snr=True), "zero_terminal_snr"),
        (dict(logit_std=0.0), "logit_std"),
        (dict(mode_scale=1.8), "mode_scale"),
        (dict(mode_scale=-1.5), "mode_scale"),
        (dict(objective="flow", shift=0.0), "shift"),
        (dict(shift=3.0), "shift"),  # discrete schedules have no shift
        (dict(shift_auto_base=32), "shift"),
        (dict(objective="flow", shift_auto_base=-1), "shift_auto_base"),
        (dict(min_snr_gamma=0.0), "min_snr_gamma"),
        (dict(loss_weighting="logit_normal"), "loss_weighting"),
        (dict(loss_weighting="cosmap"), "loss_weighting"),
        (dict(cfg_drop_prompt=1.5), "cfg_drop_prompt"),
        (dict(cfg_drop_text=-0.1), "cfg_drop_text"),
        (dict(cfg_drop_pooled=2.0), "cfg_drop_pooled"),
        (dict(cfg_drop_time_ids=-1.0), "cfg_drop_time_ids"),
        (dict(sample_steps=0), "sample_steps"),
        (dict(sample_steps=1001), "sample_steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_rescale=1.5), "guidance_rescale"),
        (dict(eta=-0.1), "eta"),
        (dict(objective="flow", sampler="ddim"), "sampler"),
        (dict(objective="flow", sampler="dpm2"), "sampler"),
        (dict(sampler="heun"), "sampler"),
        (dict(objective="flow", eta=0.5), "eta"),
        (dict(sampler="dpm2", eta=0.5), "eta"),
    ],
)
def test_invalid_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        DiffusionConfig(**overrides)


def test_root_config_overrides_and_literals():
    cfg = load_config(
        None,
        [
            "diffusion.objective=flow",
            "diffusion.timestep_sampling=logit_normal",
            "diffusion.shift=3.0",
            "diffusion.loss_weighting=min_snr",
            "diffusion.sampler=heun",
        ],
    )
    assert cfg.diffusion.objective == "flow" and cfg.diffusion.shift == 3.0
    with pytest.raises(ConfigError, match=r"diffusion\.shift:"):
        load_config(None, ["diffusion.shift=3.0"])  # eps objective
    with pytest.raises(ConfigError, match=r"diffusion\.schedule"):
        load_config(None, ["diffusion.schedule=quadratic"])
    with pytest.raises(ConfigError, match=r"diffusion\.cfg_null"):
        load_config(None, ["diffusion.cfg_null=random"])
