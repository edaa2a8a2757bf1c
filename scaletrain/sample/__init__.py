"""Sample images from exported weights.

Public API::

    sample_images(weights_dir, prompts, steps=None, cfg_scale=None, seed=0, out_dir="samples",
                  sampler=None, negative_prompt=None, height=None, width=None, ...)
        -> [{"prompt", "file", "seed"}, ...]     (file relative to out_dir)
    PromptConditioner(preprocess_cfg, max_text_tokens, arch, cfg_null)
        .cond(prompts, height, width) / .uncond(cond, negative_prompt)
    read_prompts(path) -> list[str]

The CLI (``scaletrain sample``) is :mod:`scaletrain.sample.cli`, re-exported here.
"""

from __future__ import annotations

from scaletrain.sample.cli import add_arguments, main
from scaletrain.sample.conditioning import PromptConditioner
from scaletrain.sample.pipeline import (
    GRID_NAME,
    RECORDS_NAME,
    image_file_name,
    read_prompts,
    sample_images,
)

__all__ = [
    "GRID_NAME",
    "RECORDS_NAME",
    "PromptConditioner",
    "add_arguments",
    "image_file_name",
    "main",
    "read_prompts",
    "sample_images",
]
