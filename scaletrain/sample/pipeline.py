"""Exported weights + prompts -> PNGs, ``samples.jsonl`` and a grid.

    records = sample_images("exports/step_1000", ["a red circle"], steps=30, cfg_scale=5.0,
                            seed=[0, 1], out_dir="samples")

One image per (prompt, seed), in that order: prompt-major, seeds inner. The images come from
:func:`scaletrain.sample.generate.generate`, the path training's validation grids take too.
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

from scaletrain.core.files import atomic_output, atomic_write
from scaletrain.data.encoders import build_image_encoder
from scaletrain.data.encoders.common import quiet_hub_libraries
from scaletrain.diffusion import build_sampler, make_model_fn
from scaletrain.diffusion.conditioning import cast_inputs
from scaletrain.export.reader import LoadedExport, load_export
from scaletrain.sample.conditioning import PromptConditioner
from scaletrain.sample.generate import generate
from scaletrain.sample.image_grid import images_to_uint8, save_image_grid

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
    with atomic_output(path) as tmp:
        Image.fromarray(images_to_uint8(pixels[None])[0]).save(tmp, format="PNG")


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
    model_fn = cast_inputs(make_model_fn(export.model, export.arch), dtype)

    jobs = [(p, s) for p in prompts for s in seeds]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []

    def write(start: int, pixels: torch.Tensor) -> None:
        for i, (prompt, s) in enumerate(jobs[start : start + len(pixels)]):
            name = image_file_name(start + i, prompt, s)
            _write_png(pixels[i], out / name)
            records.append({"prompt": prompt, "file": name, "seed": s})
        log.info("sampled %d/%d images", len(records), len(jobs))

    images = generate(
        model_fn, run_sampler, conditioner, image_encoder, [p for p, _ in jobs],
        [s for _, s in jobs], height, width, batch_size=batch_size, device=device,
        negative_prompt=negative_prompt, on_batch=write,
    )
    atomic_write(out / RECORDS_NAME, "".join(json.dumps(r) + "\n" for r in records))
    nrow = len(seeds) if len(seeds) > 1 else max(1, math.ceil(math.sqrt(len(images))))
    save_image_grid(images, out / GRID_NAME, nrow=nrow)
    settings = {
        "weights": str(export.path),
        "step": export.metadata.get("provenance", {}).get("step"),
        "sampler": run_sampler.__class__.__name__,
        "steps": run_sampler.steps,
        "cfg_scale": run_sampler.guidance_scale,
        "guidance_rescale": run_sampler.guidance_rescale,
        "negative_prompt": negative_prompt,
        "cfg_null": diffusion.cfg_null,
        "height": height,
        "width": width,
        "seeds": seeds,
        "num_images": len(records),
    }
    atomic_write(out / SETTINGS_NAME, json.dumps(settings, indent=1) + "\n")
    return records
