"""Exported weights + prompts -> PNGs, ``samples.jsonl`` and a grid.

    records = sample_images("exports/step_1000", ["a red circle"], steps=30, cfg_scale=5.0,
                            seed=[0, 1], out_dir="samples")

One image per (prompt, seed), in that order: prompt-major, seeds inner. Each image's initial
noise is drawn from its own CPU generator seeded with its seed, so an image depends on its
prompt, seed and settings only, not on which other images share its batch (up to float
rounding of batched kernels). Stochastic samplers (eta > 0) draw their later noise from one
generator per batch, seeded from the batch's first seed.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from scaletrain.export.reader import LoadedExport, load_export
from scaletrain.sample.conditioning import PromptConditioner

log = logging.getLogger(__name__)

RECORDS_NAME = "samples.jsonl"
GRID_NAME = "grid.png"
SETTINGS_NAME = "sample_settings.json"


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "empty"


def image_file_name(index: int, prompt: str, seed: int) -> str:
    return f"{index:04d}_{_slug(prompt)}_seed{seed}.png"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the prompts file: {exc}") from exc
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line; '#' starts a comment)")
    return prompts


def _device(name: str | torch.device | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _image_size(export: LoadedExport, image_encoder, height: int | None, width: int | None):
    """Pixel height and width: as given, else the model's training resolution."""
    f = image_encoder.downsample
    default = export.model_config.sample_size * f
    h, w = height or default, width or default
    for name, side in (("height", h), ("width", w)):
        if side % f:
            raise ValueError(
                f"--{name} {side} is not a multiple of the image encoder's downsampling ({f})"
            )
    if export.arch == "unet":
        # Each level but the last halves the latent; the up path must meet the skips again.
        m = 2 ** (len(export.model_config.block_out_channels) - 1)
        for name, side in (("height", h), ("width", w)):
            if (side // f) % m:
                raise ValueError(f"--{name} {side}: the latent side {side // f} must be a "
                                 f"multiple of {m} (the U-Net downsamples {m}x)")
    if export.arch == "mmdit":
        p = export.model_config.patch_size
        limit = export.model_config.pos_embed_max_size * p * f
        for name, side in (("height", h), ("width", w)):
            if (side // f) % p:
                raise ValueError(f"--{name} {side}: the latent side must be a multiple of the "
                                 f"patch size {p}")
            if side > limit:
                raise ValueError(f"--{name} {side} exceeds what the model's positional table "
                                 f"covers ({limit} pixels)")
    return h, w


def _write_png(pixels: torch.Tensor, path: Path) -> None:
    from scaletrain.train.monitor.image_grid import images_to_uint8

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(images_to_uint8(pixels[None])[0]).save(tmp, format="PNG")
    tmp.replace(path)


def sample_images(
    weights_dir: str | Path,
    prompts: Sequence[str],
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int | Sequence[int] = 0,
    out_dir: str | Path = "samples",
    *,
    sampler: str | None = None,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    eta: float | None = None,
    guidance_rescale: float | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype = torch.float32,
    preprocess=None,
    export: LoadedExport | None = None,
) -> list[dict[str, Any]]:
    """Sample one image per (prompt, seed) and write them to ``out_dir``.

    Writes ``{index:04d}_{prompt-slug}_seed{seed}.png`` per image, ``samples.jsonl`` (one
    ``{"prompt", "file", "seed"}`` a line, ``file`` relative to ``out_dir``), ``grid.png``
    (a row per prompt when there are several seeds) and ``sample_settings.json``. Returns the
    records. ``steps``, ``cfg_scale`` and ``sampler`` default to the run's diffusion section;
    ``preprocess`` (a PreprocessConfig) overrides the export's encoders; ``export`` reuses an
    already loaded export.
    """
    from data_pipeline.encoders import build_image_encoder
    from data_pipeline.encoders.common import quiet_hub_libraries
    from scaletrain.diffusion import build_sampler, make_model_fn

    quiet_hub_libraries()  # no per-model load reports and progress bars from transformers

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
    if not seeds:
        raise ValueError("no seeds given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device(device)
    if export is None:
        export = load_export(weights_dir, device=device, dtype=dtype, preprocess=preprocess)
    elif preprocess is not None:
        export.preprocess = preprocess
    diffusion = export.diffusion
    image_encoder = build_image_encoder(export.preprocess, device=device)
    if image_encoder.latent_channels != export.model_config.in_channels:
        raise ValueError(
            f"the image encoder ({image_encoder.kind}) makes {image_encoder.latent_channels}-"
            f"channel latents but model.in_channels is {export.model_config.in_channels}; "
            "pass the encoders the model was trained with (--encoders YAML)"
        )
    conditioner = PromptConditioner(
        export.preprocess, export.max_text_tokens, export.arch, diffusion.cfg_null, device=device
    )
    conditioner.check_model(export.model_config)
    height, width = _image_size(export, image_encoder, height, width)
    run_sampler = build_sampler(
        diffusion, name=sampler, steps=steps, guidance_scale=cfg_scale,
        guidance_rescale=guidance_rescale, eta=eta,
    )
    scale = run_sampler.guidance_scale
    model_fn = _in_dtype(make_model_fn(export.model, export.arch), dtype)
    f = image_encoder.downsample
    latent_shape = (export.model_config.in_channels, height // f, width // f)

    jobs = [(p, s) for p in prompts for s in seeds]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    images: list[torch.Tensor] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        batch_prompts = [p for p, _ in chunk]
        cond = conditioner.cond(batch_prompts, height, width)
        uncond = conditioner.uncond(cond, negative_prompt) if scale != 1.0 else None
        noise = torch.stack([
            torch.randn(latent_shape, generator=torch.Generator().manual_seed(s))
            for _, s in chunk
        ])
        gen = torch.Generator(device=device).manual_seed(chunk[0][1])
        with torch.no_grad():
            latents = run_sampler(
                model_fn,
                noise.to(device),
                _to(cond, device, dtype),
                _to(uncond, device, dtype) if uncond is not None else None,
                generator=gen,
            )
            pixels = image_encoder.decode(image_encoder.unscale(latents.float()))
        for i, (prompt, s) in enumerate(chunk):
            name = image_file_name(start + i, prompt, s)
            _write_png(pixels[i], out / name)
            records.append({"prompt": prompt, "file": name, "seed": s})
            images.append(pixels[i].cpu())
        log.info("sampled %d/%d images", len(records), len(jobs))

    _write_records(out / RECORDS_NAME, records)
    from scaletrain.train.monitor.image_grid import save_image_grid

    nrow = len(seeds) if len(seeds) > 1 else max(1, math.ceil(math.sqrt(len(images))))
    save_image_grid(torch.stack(images), out / GRID_NAME, nrow=nrow)
    settings = {
        "weights": str(export.path),
        "step": export.metadata.get("provenance", {}).get("step"),
        "sampler": run_sampler.__class__.__name__,
        "steps": run_sampler.steps,
        "cfg_scale": scale,
        "guidance_rescale": run_sampler.guidance_rescale,
        "negative_prompt": negative_prompt,
        "cfg_null": diffusion.cfg_null,
        "height": height,
        "width": width,
        "seeds": seeds,
        "num_images": len(records),
    }
    (out / SETTINGS_NAME).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    return records


def _in_dtype(model_fn, dtype: torch.dtype):
    """The samplers keep x in float32; a model held in another dtype gets its input cast."""
    if dtype == torch.float32:
        return model_fn
    return lambda x, t, cond: model_fn(x.to(dtype), t, cond)


def _to(cond: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    return {
        k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in cond.items()
    }


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    tmp.replace(path)
