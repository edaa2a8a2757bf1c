"""Build a Validator from the real components: the diffusion sampler and the encoders.

The loop calls::

    validator = build_validator(
        cfg.validation, cfg.diffusion, cfg.preprocess, cfg.data, run_dir,
        latent_shape=tuple(first_batch["latents"].shape[1:]), rank=rank, device=device,
        null_cond=loader.empty_conditioning(), scaling_factor=loader.info.scaling_factor,
        shift_factor=loader.info.shift_factor, metrics_logger=metrics_logger,
    )
    ...
    if validator.should_run(step):
        validator.run(step, ema_model_fn)   # on every rank

Prompts are encoded with the preprocessing text encoder (the one that made the shards) and
laid out exactly as the loader lays out a batch (``assemble_text``), with SDXL
micro-conditioning for an uncropped image of the sampled size. The text encoder is built on
the first validation, used for the prompts (and the empty prompt), then freed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scaletrain.train.monitor.config import ValidationConfig
from scaletrain.train.monitor.validation import Validator


def prompt_conditioning(
    text: dict[str, torch.Tensor], max_text_tokens: int, image_size: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """TextEncoder.encode output -> the loader's batch conditioning for these prompts.

    time_ids are SDXL's (original_size, crop_top_left, target_size) (Podell et al. 2023,
    §2.2) for an image generated whole at ``image_size``: (H, W, 0, 0, H, W).
    """
    from data_pipeline.encoders import unbatch_text
    from data_pipeline.loader.batching import assemble_text

    samples = unbatch_text(text)
    t5 = [s["t5_hidden_states"] for s in samples] if "t5_hidden_states" in text else None
    context, mask, _ = assemble_text([s["hidden_states"] for s in samples], t5, max_text_tokens)
    h, w = image_size
    return {
        "encoder_hidden_states": context,
        "encoder_attention_mask": mask,
        "pooled": torch.stack([s["pooled"] for s in samples]).float(),
        "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * len(samples), dtype=torch.float32),
    }


def build_validator(
    cfg: ValidationConfig,
    diffusion_cfg,
    preprocess_cfg,
    data_cfg,
    run_dir: str | Path,
    *,
    latent_shape: tuple[int, int, int],
    rank: int = 0,
    device: torch.device | str = "cpu",
    null_cond: dict[str, torch.Tensor] | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    metrics_logger=None,
) -> Validator:
    """A Validator sampling with ``cfg``'s sampler and decoding with the shards' encoder.

    ``null_cond`` is the empty prompt in the batch layout (``loader.empty_conditioning()``),
    needed when ``diffusion.cfg_null`` is "empty_prompt"; if absent, it is encoded here.
    ``scaling_factor``/``shift_factor`` are the ones the loader scaled latents with (the
    dataset index's, ``loader.info``); None takes the image encoder's.
    """
    from data_pipeline.encoders import build_image_encoder, build_text_encoder
    from scaletrain.diffusion import build_sampler, make_uncond

    image_encoder = build_image_encoder(preprocess_cfg, device=device)
    image_size = (
        latent_shape[1] * image_encoder.downsample,
        latent_shape[2] * image_encoder.downsample,
    )
    max_tokens = data_cfg.max_text_tokens
    sampler = build_sampler(
        diffusion_cfg, name=cfg.sampler, steps=cfg.steps, guidance_scale=cfg.guidance_scale
    )
    text_encoder: list[Any] = []  # built on first use

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        if not text_encoder:
            text_encoder.append(build_text_encoder(preprocess_cfg, device=device))
        return prompt_conditioning(text_encoder[0].encode(prompts), max_tokens, image_size)

    def uncond_for(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        null = null_cond
        if null is None and diffusion_cfg.cfg_null == "empty_prompt":
            empty = encode_prompts([""])
            null = {k: v[0] for k, v in empty.items() if k != "time_ids"}
        return make_uncond(cond, diffusion_cfg.cfg_null, null)

    def sample(model_fn, noise, cond, uncond, generator):
        return sampler(model_fn, noise, cond, uncond, generator=generator, device=noise.device)

    scale = image_encoder.scaling_factor if scaling_factor is None else scaling_factor
    shift = image_encoder.shift_factor if shift_factor is None else shift_factor

    def decode(latents: torch.Tensor) -> torch.Tensor:
        # Undo the loader's (z - shift) * scale, then decode to pixels.
        return image_encoder.decode(latents.float() / scale + shift)

    # The Validator drops encode_prompts and uncond_for once it has the conditioning, and
    # with them the last references to the text encoder.
    return Validator(
        cfg,
        run_dir,
        latent_shape=latent_shape,
        encode_prompts=encode_prompts,
        sample=sample,
        decode=decode,
        make_uncond=uncond_for,
        device=device,
        rank=rank,
        metrics_logger=metrics_logger,
    )
