"""Image encoders: pixels in [-1, 1] -> a latent distribution, and back.

Both encoders share one interface, used by preprocessing (``encode``) and by the sampler
(``decode``):

* ``encode(pixels)``: (B, 3, H, W) float in [-1, 1] -> ``{"mean", "std"}``, each
  (B, C, H/f, W/f), CPU tensors in the storage dtype: exactly what a shard holds.
* ``decode(latents)``: (B, C, h, w) latents in the same (unscaled) space as ``mean`` ->
  (B, 3, h*f, w*f) float32 pixels in [-1, 1] on the CPU.
* ``scale(z) = (z - shift_factor) * scaling_factor`` maps a latent into the unit-variance
  space the diffusion model works in (SD3's convention, which reduces to SDXL's when the
  shift is 0); ``unscale`` inverts it before ``decode``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F

from scaletrain.data.encoders.common import (
    DTYPE_NAMES,
    load_failure,
    quiet_hub_libraries,
    resolve_device,
    torch_dtype,
)

log = logging.getLogger(__name__)


class ImageEncoder(ABC):
    kind: str
    latent_channels: int
    downsample: int
    scaling_factor: float
    shift_factor: float
    store_dtype: torch.dtype
    device: torch.device

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What a manifest records to say which encoder made the latents."""

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.shift_factor) * self.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor + self.shift_factor

    def _common_identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "dtype": DTYPE_NAMES[self.store_dtype],
        }


def _check_pixels(pixels: torch.Tensor, multiple: int) -> None:
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels (B, 3, H, W), got {tuple(pixels.shape)}")
    if pixels.shape[2] % multiple or pixels.shape[3] % multiple:
        raise ValueError(
            f"image side {tuple(pixels.shape[2:])} is not a multiple of the encoder's "
            f"downsampling factor {multiple}"
        )


class PixelEncoder(ImageEncoder):
    """Exact, invertible space-to-depth: each f x f patch of RGB becomes 3*f*f channels.

    Pixel-space models then see a (3f^2, H/f, W/f) "latent" with no information lost (the
    patchify of Simple Diffusion, Hoogeboom et al. 2023, done once offline). The distribution
    is a point mass: ``std`` is stored as zeros so the loader's draw ``mean + std * eps`` is
    the pixels themselves. Values are [-1, 1], already unit scale: scaling 1, shift 0.
    """

    kind = "pixel"

    def __init__(self, factor: int = 2, dtype: str = "fp16") -> None:
        self.downsample = factor
        self.latent_channels = 3 * factor * factor
        self.scaling_factor = 1.0
        self.shift_factor = 0.0
        self.store_dtype = torch_dtype(dtype)
        self.device = torch.device("cpu")

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_pixels(pixels, self.downsample)
        mean = F.pixel_unshuffle(pixels.float().cpu(), self.downsample).to(self.store_dtype)
        return {"mean": mean, "std": torch.zeros_like(mean)}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        return F.pixel_shuffle(latents.float().cpu(), self.downsample)

    def identity(self) -> dict[str, Any]:
        return {**self._common_identity(), "factor": self.downsample}


class VAEEncoder(ImageEncoder):
    """A diffusers AutoencoderKL, loaded from a hub id or a local directory.

    Stores the diagonal Gaussian's mean and std (``latent_dist.mean``/``.std``): training
    draws ``mean + std * eps`` afresh each epoch, as online encoding would.
    """

    kind = "vae"

    def __init__(
        self,
        name: str,
        subfolder: str | None = None,
        dtype: str = "bf16",
        compute_dtype: str = "fp32",
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        device: str | torch.device | None = "auto",
    ) -> None:
        from diffusers import AutoencoderKL  # heavy: imported when a VAE is used

        # Every load (preprocess, validation, evaluation, sampling) is quiet, and a hub id
        # that cannot be fetched is one line (load_failure), not the client's retries.
        quiet_hub_libraries(("huggingface_hub", "diffusers"))
        self.name = name
        self.subfolder = subfolder
        self.device = resolve_device(device)
        self.compute_dtype = torch_dtype(compute_dtype)
        self.store_dtype = torch_dtype(dtype)
        kwargs = {"subfolder": subfolder} if subfolder else {}
        try:
            vae = AutoencoderKL.from_pretrained(name, torch_dtype=self.compute_dtype, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the hub client's errors are of many kinds
            raise load_failure("VAE", name, subfolder, exc) from exc
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        config_scale = getattr(cfg, "scaling_factor", None)
        config_shift = getattr(cfg, "shift_factor", None)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else config_scale)
        self.shift_factor = float(
            shift_factor if shift_factor is not None else (config_shift or 0.0)
        )

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_pixels(pixels, self.downsample)
        x = pixels.to(self.device, self.compute_dtype)
        dist = self.vae.encode(x).latent_dist
        return {
            "mean": dist.mean.to("cpu", self.store_dtype),
            "std": dist.std.to("cpu", self.store_dtype),
        }

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, self.compute_dtype)
        return self.vae.decode(z).sample.float().clamp(-1, 1).cpu()

    def identity(self) -> dict[str, Any]:
        return {
            **self._common_identity(),
            "name": self.name,
            "subfolder": self.subfolder,
            "compute_dtype": DTYPE_NAMES[self.compute_dtype],
            "class": type(self.vae).__name__,
        }
