"""Validation samples: fixed prompts, fixed seeds, EMA weights, one PNG grid per check.

Fixed prompts *and* fixed initial noise make grids of different steps comparable image by
image, so a reader sees the model (not the noise) change. Each prompt's initial noise comes
from its own CPU generator seeded with its seed, so with a deterministic sampler (Euler/DDIM
ODE) an image does not depend on which prompts share its batch, on ``batch_size`` or on the
device. A stochastic sampler's later noise comes from one generator per batch (seeded with
the batch's first seed): reproducible, but tied to the batching.

The Validator is written against three callables so it does not depend on how the sampler
and the encoders are built (the loop wires them; see ``scaletrain.train`` for the wiring):

* ``encode_prompts(list[str]) -> dict[str, Tensor]``: text conditioning, batch first.
  Called once (the result is cached), so the text encoder can be freed afterwards.
* ``sample(model_fn, noise, cond, uncond, generator) -> latents``: runs the sampler from
  ``noise`` (steps, sampler and guidance scale already bound); ``uncond`` is None when
  guidance is off. ``generator`` drives any noise a stochastic sampler draws on the way.
* ``decode(latents) -> images`` in [-1, 1], shape [N, 3, H, W].

``model_fn`` (EMA weights) is passed to ``run`` by the loop. Call ``run`` on every rank:
under ZeRO-3 the EMA weights are sharded and evaluating them may gather collectively.
Only rank 0 writes the grid and logs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scaletrain.train.monitor.config import ValidationConfig
from scaletrain.train.monitor.image_grid import save_image_grid

logger = logging.getLogger(__name__)

EncodePrompts = Callable[[list[str]], dict[str, Any]]
Decode = Callable[[torch.Tensor], torch.Tensor]
Sample = Callable[..., torch.Tensor]

IMAGE_KEY = "validation/samples"


def grid_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "validation" / f"step_{step:09d}.png"


def initial_noise(
    seeds: list[int], latent_shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """One standard-normal latent per seed, each from its own CPU generator."""
    return torch.stack(
        [
            torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
            for seed in seeds
        ]
    )


def _slice_cond(cond: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {k: v[start:stop] if torch.is_tensor(v) else v for k, v in cond.items()}


def _to_device(cond: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in cond.items()}


class Validator:
    """Sample the configured prompts every ``cfg.every`` steps and save/log a PNG grid.

    Args:
        cfg: the ``validation`` config section.
        run_dir: grids go to ``run_dir/validation/step_{N:09d}.png``.
        latent_shape: (C, h, w) of one latent at the sampling resolution.
        encode_prompts, sample, decode: see the module docstring.
        device: where noise and conditioning go before sampling.
        rank: global rank; only rank 0 writes files and logs.
        metrics_logger: a MetricsLogger to log the grid to (wandb and JSONL), or None.
    """

    def __init__(
        self,
        cfg: ValidationConfig,
        run_dir: str | Path,
        *,
        latent_shape: tuple[int, ...],
        encode_prompts: EncodePrompts,
        sample: Sample,
        decode: Decode,
        device: torch.device | str = "cpu",
        rank: int = 0,
        metrics_logger=None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.seeds = cfg.seed_list()
        self.device = torch.device(device)
        self.rank = rank
        self.metrics_logger = metrics_logger
        self._encode_prompts: EncodePrompts | None = encode_prompts
        self._sample = sample
        self._decode = decode
        self._cond: dict[str, Any] | None = None
        self._uncond: dict[str, Any] | None = None

    def should_run(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def _conditioning(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if self._cond is None:
            prompts = list(self.cfg.prompts)
            self._cond = self._encode_prompts(prompts)
            if self.cfg.guidance_scale != 1.0:
                # The unconditional branch of classifier-free guidance (Ho & Salimans 2022)
                # is the empty prompt, as in training's conditioning dropout.
                self._uncond = self._encode_prompts([""] * len(prompts))
            self._encode_prompts = None  # the encoder is not needed again; let it be freed
        return self._cond, self._uncond

    @torch.no_grad()
    def generate(self, model_fn: Callable) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] for the configured prompts (on every rank)."""
        cond, uncond = self._conditioning()
        noise = initial_noise(self.seeds, self.latent_shape)
        images = []
        bs = self.cfg.batch_size
        for start in range(0, len(self.seeds), bs):
            stop = min(start + bs, len(self.seeds))
            generator = torch.Generator(device=self.device).manual_seed(self.seeds[start])
            latents = self._sample(
                model_fn,
                noise[start:stop].to(self.device),
                _to_device(_slice_cond(cond, start, stop), self.device),
                None if uncond is None else _to_device(_slice_cond(uncond, start, stop), self.device),
                generator,
            )
            images.append(self._decode(latents).float().cpu())
        return torch.cat(images)

    def run(self, step: int, model_fn: Callable) -> Path | None:
        """Sample, then on rank 0 save the grid and log it; returns its path (None elsewhere)."""
        images = self.generate(model_fn)
        if self.rank != 0:
            return None
        path = save_image_grid(images, grid_path(self.run_dir, step), nrow=self.cfg.nrow)
        logger.info("validation grid for step %d: %s", step, path)
        if self.metrics_logger is not None:
            caption = " | ".join(
                f"[{seed}] {prompt}" for seed, prompt in zip(self.seeds, self.cfg.prompts)
            )
            self.metrics_logger.log_image(step, IMAGE_KEY, path, caption=caption)
        return path
