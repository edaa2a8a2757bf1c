"""Logging and validation config sections: defaults load, bad values name their key."""

import pytest

from scaletrain.config import load_config
from scaletrain.core.config_base import ConfigError


def test_defaults_load_and_validation_seeds_default_to_indices():
    cfg = load_config(None)
    assert cfg.logging.wandb_mode == "offline"
    assert cfg.validation.seed_list() == list(range(len(cfg.validation.prompts)))


def test_overrides_reach_the_sections():
    cfg = load_config(
        None,
        [
            "logging.peak_tflops=312",
            "logging.wandb_mode=disabled",
            "validation.prompts=[a,b]",
            "validation.seeds=[7,9]",
            "validation.every=50",
        ],
    )
    assert cfg.logging.peak_tflops == 312.0
    assert cfg.validation.seed_list() == [7, 9]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("logging.every=0", "logging.every"),
        ("logging.wandb_mode=cloud", "logging.wandb_mode"),
        ("logging.loss_buckets=0", "logging.loss_buckets"),
        ("logging.peak_tflops=-1", "logging.peak_tflops"),
        ("logging.diagnostics_every=-5", "logging.diagnostics_every"),
        ("validation.seeds=[1,2,3]", "validation.seeds"),
        ("validation.prompts=[]", "validation.prompts"),
        ("validation.steps=0", "validation.steps"),
        ("validation.guidance_scale=0.5", "validation.guidance_scale"),
        ("validation.nrow=0", "validation.nrow"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(None, [override])
