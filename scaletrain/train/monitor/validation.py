"""Validation samples: fixed prompts, fixed seeds, EMA weights, one PNG grid per check.

Fixed prompts *and* fixed initial noise make grids of different steps comparable image by
image, so a reader sees the model (not the noise) change. The images come from
:func:`scaletrain.sample.generate.generate`, the path ``scaletrain sample`` takes: a prompt
sampled here at step N and the same prompt, seed and settings sampled from the export of
step N are the same image. Prompts are encoded with the run's own text encoder, laid out as
the loader lays out a batch, guided against what training's prompt dropout put in place of
a caption (``diffusion.cfg_null``), and decoded with the latent scaling of the dataset.

The encoders are built at the first validation (not at start-up), the prompts encoded once,
and the text encoder freed. Call ``run`` on every rank: under ZeRO-3 the EMA weights are
sharded and evaluating them gathers collectively. Only rank 0 writes the grid and logs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from scaletrain.data.encoders import build_image_encoder
from scaletrain.data.encoders.image import ImageEncoder
from scaletrain.diffusion import build_sampler
from scaletrain.sample.conditioning import PromptConditioner
from scaletrain.sample.generate import generate
from scaletrain.sample.image_grid import save_image_grid

logger = logging.getLogger(__name__)

IMAGE_KEY = "validation/samples"


def grid_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "validation" / f"step_{step:09d}.png"


class Validator:
    """Sample ``cfg.validation``'s prompts every ``every`` steps and save/log a PNG grid.

    Args:
        cfg: the root config (its validation, diffusion, preprocess, data and model sections).
        run_dir: grids go to ``run_dir/validation/step_{N:09d}.png``.
        device: where sampling runs (the training device); the encoders stay on the CPU.
        rank: global rank; only rank 0 writes files and logs.
        metrics_logger: a MetricsLogger to log the grid to (wandb and JSONL), or None.
        latent_scaling: (scaling_factor, shift_factor) the loader scaled latents with (the
            dataset index's); None takes the image encoder's own.
    """

    def __init__(self, cfg, run_dir: str | Path, *, device: torch.device | str = "cpu",
                 rank: int = 0, metrics_logger=None,
                 latent_scaling: tuple[float, float] | None = None) -> None:
        self.cfg = cfg.validation
        self.root = cfg
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.rank = rank
        self.metrics_logger = metrics_logger
        self.latent_scaling = latent_scaling
        self.prompts = list(self.cfg.prompts)
        self.seeds = self.cfg.seed_list()
        self.sampler = build_sampler(cfg.diffusion, name=self.cfg.sampler, steps=self.cfg.steps,
                                     guidance_scale=self.cfg.guidance_scale)
        self._conditioner: PromptConditioner | None = None
        self._image_encoder: ImageEncoder | None = None

    def should_run(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    @property
    def image_size(self) -> tuple[int, int]:
        side = self.root.model.sample_size * self.encoders()[1].downsample
        return side, side

    def encoders(self) -> tuple[PromptConditioner, ImageEncoder]:
        """The prompt conditioner (prompts encoded, text encoder freed) and image encoder."""
        if self._conditioner is None:
            root = self.root
            conditioner = PromptConditioner(root.preprocess, root.data.max_text_tokens,
                                            root.model.arch, root.diffusion.cfg_null, device="cpu")
            conditioner.release_encoder(self.prompts)
            image_encoder = build_image_encoder(root.preprocess, device="cpu")
            if self.latent_scaling is not None:
                image_encoder.scaling_factor, image_encoder.shift_factor = self.latent_scaling
            self._conditioner, self._image_encoder = conditioner, image_encoder
        return self._conditioner, self._image_encoder

    def generate(self, model_fn: Callable) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] for the configured prompts (on every rank)."""
        conditioner, image_encoder = self.encoders()
        height, width = self.image_size
        return generate(model_fn, self.sampler, conditioner, image_encoder, self.prompts,
                        self.seeds, height, width, batch_size=self.cfg.batch_size,
                        device=self.device)

    def run(self, step: int, model_fn: Callable) -> Path | None:
        """Sample, then on rank 0 save the grid and log it; returns its path (None elsewhere)."""
        images = self.generate(model_fn)
        if self.rank != 0:
            return None
        path = save_image_grid(images, grid_path(self.run_dir, step), nrow=self.cfg.nrow)
        logger.info("validation grid for step %d: %s", step, path)
        if self.metrics_logger is not None:
            caption = " | ".join(f"[{seed}] {prompt}" for seed, prompt in zip(self.seeds,
                                                                              self.prompts))
            self.metrics_logger.log_image(step, IMAGE_KEY, path, caption=caption)
        return path
