"""The one path from prompts to pixels: conditioning -> noise -> sampler -> decode.

``scaletrain sample`` (:func:`scaletrain.sample.pipeline.sample_images`) and the validation
grids of a training run (:mod:`scaletrain.train.monitor.validation`) both call
:func:`generate`, so an image sampled during training and the same prompt and seed sampled
later from that step's export are the same image.

Each image's initial noise is drawn from its own CPU generator seeded with its seed, so an
image depends on its prompt, seed and settings only, not on which other images share its
batch (up to float rounding of batched kernels) nor on the device. A stochastic sampler
(eta > 0) draws its later noise from one CPU generator per batch, seeded with the batch's
first seed: reproducible, but tied to the batching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from scaletrain.data.encoders.image import ImageEncoder
from scaletrain.diffusion.conditioning import ModelFn
from scaletrain.diffusion.samplers import Sampler
from scaletrain.sample.conditioning import PromptConditioner


def initial_noise(seeds: Sequence[int], latent_shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal latent per seed, each from its own CPU generator."""
    return torch.stack([
        torch.randn(latent_shape, generator=torch.Generator().manual_seed(int(seed)))
        for seed in seeds
    ])


def _to_device(cond: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in cond.items()}


@torch.no_grad()
def generate(
    model_fn: ModelFn,
    sampler: Sampler,
    conditioner: PromptConditioner,
    image_encoder: ImageEncoder,
    prompts: Sequence[str],
    seeds: Sequence[int],
    height: int,
    width: int,
    *,
    batch_size: int,
    device: torch.device | str,
    negative_prompt: str | None = None,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Images [N, 3, height, width] in [-1, 1] (CPU, float32), one per (prompt, seed) pair.

    ``model_fn(x, t, cond)`` takes float32 inputs and casts them to the model's dtype itself
    (:func:`scaletrain.diffusion.conditioning.cast_inputs`). Guidance (the sampler's
    ``guidance_scale`` != 1) runs against the conditioner's unconditional branch, or against
    ``negative_prompt``. ``on_batch(start, pixels)`` is called after each batch (progress,
    writing files as they come). A collective under ZeRO-3: every rank must call it.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per image")
    device = torch.device(device)
    f = image_encoder.downsample
    latent_shape = (image_encoder.latent_channels, height // f, width // f)
    guided = sampler.guidance_scale != 1.0
    images = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start : start + batch_size])
        batch_seeds = list(seeds[start : start + batch_size])
        cond = conditioner.cond(batch_prompts, height, width)
        uncond = conditioner.uncond(cond, negative_prompt) if guided else None
        latents = sampler(
            model_fn,
            initial_noise(batch_seeds, latent_shape).to(device),
            _to_device(cond, device),
            _to_device(uncond, device) if uncond is not None else None,
            generator=torch.Generator().manual_seed(batch_seeds[0]),
        )
        latents = latents.float().to(image_encoder.device)
        pixels = image_encoder.decode(image_encoder.unscale(latents)).float().cpu()
        if on_batch is not None:
            on_batch(start, pixels)
        images.append(pixels)
    return torch.cat(images)
