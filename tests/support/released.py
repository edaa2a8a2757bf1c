"""Stand-ins for released weights: tiny diffusers models with random weights, saved the way
Stability and diffusers publish them (pipeline folders, sharded files, single files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from scaletrain.models.diffusers_compat import diffusers_class_name, diffusers_config
from scaletrain.models.key_maps import SINGLE_FILE_PREFIX, sd3_state_dict, sgm_unet_state_dict

SUBFOLDER = {"unet": "unet", "mmdit": "transformer"}


def diffusers_model(model_cfg, seed: int = 0):
    """diffusers' own class for ``model_cfg``, every parameter moved off its init (zero-init
    gates would otherwise hide a wrong map), in fp32 and eval mode. No element is exactly 0,
    so that one step at a negligible learning rate changes no weight."""
    import diffusers  # a model of theirs is built here (seconds to import)

    torch.manual_seed(seed)
    model = getattr(diffusers, diffusers_class_name(model_cfg))(**diffusers_config(model_cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
            p[p == 0] = 0.01
    return model.eval()


def save_pipeline(model, model_cfg, root: Path, max_shard_size: str | None = "200KB") -> Path:
    """A diffusers pipeline folder (model_index.json + unet/ or transformer/) holding
    ``model``, sharded into many files when ``max_shard_size`` is given."""
    root.mkdir(parents=True, exist_ok=True)
    sub = SUBFOLDER[model_cfg.arch]
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline" if sub == "unet"
         else "StableDiffusion3Pipeline", sub: ["diffusers", type(model).__name__]}))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(root / sub, **kwargs)
    return root


def save_single_file(state: dict[str, torch.Tensor], model_cfg, path: Path,
                     prefix: bool = True) -> Path:
    """Our state dict in the original single-file layout (SDXL sgm or SD3), with a VAE and a
    text-encoder tensor beside it as in the released files."""
    if model_cfg.arch == "unet":
        tensors = sgm_unet_state_dict(state, model_cfg)
    else:
        tensors = sd3_state_dict(state, model_cfg)
    if not prefix:
        tensors = {k.removeprefix(SINGLE_FILE_PREFIX): v for k, v in tensors.items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    tensors["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = (
        torch.ones(8))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
