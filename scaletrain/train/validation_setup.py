"""Wiring of validation sampling: the monitor's Validator fed by the data pipeline's encoders
and the diffusion sampler, run on the EMA weights.

Prompts are encoded once with the preprocessing preset's text encoder (so they look like the
training conditioning), laid out as the loader lays out a batch, sampled with the configured
sampler, un-scaled with the dataset's latent factors and decoded with its image encoder.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def build_validator(cfg, run_dir, rank: int, device: torch.device, metrics_logger, loader):
    """A monitor Validator for this run, or None when validation.every is 0."""
    if cfg.validation.every == 0:
        return None
    from data_pipeline.encoders import build_image_encoder, build_text_encoder, unbatch_text
    from data_pipeline.loader.batching import text_context
    from scaletrain.diffusion import build_sampler
    from scaletrain.train.monitor import Validator

    v = cfg.validation
    image_encoder = build_image_encoder(cfg.preprocess, device="cpu")
    side = cfg.model.sample_size
    latent_shape = (cfg.model.in_channels, side, side)
    pixels = side * image_encoder.downsample
    info = getattr(loader, "info", None)
    scaling = getattr(info, "scaling_factor", image_encoder.scaling_factor)
    shift = getattr(info, "shift_factor", image_encoder.shift_factor)

    def encode_prompts(prompts: list[str]) -> dict[str, Any]:
        encoder = build_text_encoder(cfg.preprocess, device="cpu")
        records = [text_context(t, cfg.data.max_text_tokens)
                   for t in unbatch_text(encoder.encode(prompts))]
        cond = {k: torch.stack([r[k] for r in records]) for k in records[0]}
        # SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): an uncropped image of the
        # sampling size, as the loader builds time_ids from original/crop/target sizes.
        cond["time_ids"] = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * len(prompts),
                                        dtype=torch.float32)
        return cond

    sampler = build_sampler(cfg.diffusion, name=v.sampler, steps=v.steps,
                            guidance_scale=v.guidance_scale)

    def sample(model_fn, noise, cond, uncond, generator):
        return sampler(model_fn, noise, cond, uncond, generator=generator)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return image_encoder.decode((latents.float().cpu() / scaling) + shift)

    return Validator(v, run_dir, latent_shape=latent_shape, encode_prompts=encode_prompts,
                     sample=sample, decode=decode, device=device, rank=rank,
                     metrics_logger=metrics_logger)
