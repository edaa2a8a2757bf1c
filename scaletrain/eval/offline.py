"""Evaluation outside training: what ``scaletrain eval`` runs.

``evaluate_weights(path, cfg.eval, out_dir)`` evaluates an export (either layout, its
weights as exported) or a checkpoint of a run (its EMA weights, and the raw weights' loss
too; the raw weights alone when the run kept no EMA) with the same :class:`Evaluator` as
training, and writes ``eval.json``. ``fid_between(real, fake)`` is the FID of two image
sets (folders, shard patterns or cached ``.npz`` statistics).

Run by one process or by N (``--nproc``, torchrun, SLURM): every rank loads the weights and
takes its share of the work, as in training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaletrain.core.files import atomic_write
from scaletrain.core.run_dir import eval_dir, read_state, resolve_checkpoint, step_dir_name
from scaletrain.data.loader.dataset_index import load_dataset_index
from scaletrain.diffusion.conditioning import cast_inputs, make_model_fn
from scaletrain.eval.config import EvalConfig
from scaletrain.eval.evaluator import EvalSetting, Evaluator, image_source_features
from scaletrain.eval.fid import (
    FeatureStats,
    build_inception,
    check_cached,
    feature_stats,
    fid_of,
    load_stats,
    preprocessing,
)
from scaletrain.eval.sharing import broadcast_from_main, world
from scaletrain.export.consolidate import consolidate_ema, consolidate_model
from scaletrain.export.layout import ExportError, metadata_path
from scaletrain.export.reader import load_export
from scaletrain.export.writer import check_state_dict, load_run_config
from scaletrain.models import build_model

log = logging.getLogger(__name__)

RESULT_NAME = "eval.json"


@dataclass
class Weights:
    """A model to evaluate and where it came from."""

    model: torch.nn.Module
    kind: str  # "ema" or "raw"


@dataclass
class Source:
    """The weights of an export or a checkpoint, and what evaluation needs to know of them."""

    weights: list[Weights]  # the first is the one sampled for FID and CLIP score
    setting: EvalSetting
    info: dict[str, Any]  # path, kind (export|checkpoint), step, ...
    default_out: Path
    default_stats: Path


def is_export(path: str | Path) -> bool:
    return metadata_path(path).is_file()


def load_source(path: str | Path, step: int | None, device: torch.device,
                dtype: torch.dtype, raw_loss: bool) -> Source:
    """The weights under ``path`` (an export, a run directory or a ``step_*`` directory)."""
    path = Path(path)
    if is_export(path):
        if step is not None:
            raise ExportError(f"--step {step}: {path} is an export (one step); drop --step")
        export = load_export(path, device=device, dtype=dtype)
        prov = export.metadata.get("provenance", {})
        setting = EvalSetting(export.diffusion, export.preprocess, export.max_text_tokens,
                              export.arch, export.model_config.sample_size)
        out = path.parent / f"{path.name}_eval"
        info = {"kind": "export", "path": str(path.resolve()), "step": prov.get("step"),
                "weights": prov.get("weights"), "checkpoint": prov.get("checkpoint")}
        return Source([Weights(export.model, str(prov.get("weights") or "ema"))], setting, info,
                      out, out / "fid_reference.npz")
    try:
        checkpoint = resolve_checkpoint(path, step)
    except FileNotFoundError as exc:
        raise ExportError(f"{exc} (and it is not an export: no {metadata_path(path).name})") \
            from exc
    run = load_run_config(checkpoint)
    state = read_state(checkpoint)
    scaling = None
    try:  # the trainer scales latents with its dataset's factors; so does its evaluation
        index = load_dataset_index(run.data.path)
        scaling = (index.scaling_factor, index.shift_factor)
    except (OSError, ValueError):
        log.warning("data.path %r of the run is not readable; latents are unscaled with the "
                    "image encoder's own factors", run.data.path)
    setting = EvalSetting(run.diffusion, run.preprocess, run.data.max_text_tokens,
                          run.model.arch, run.model.sample_size, run.data.path, scaling)
    kinds = ["ema", "raw"] if (checkpoint / "ema").is_dir() else ["raw"]
    if not raw_loss:
        kinds = kinds[:1]
    weights = []
    for kind in kinds:
        tensors = consolidate_ema(checkpoint) if kind == "ema" else consolidate_model(checkpoint)
        check_state_dict(tensors, run.model, str(checkpoint))
        model = build_model(run.model, device="meta")
        model.load_state_dict(tensors, strict=True, assign=True)
        weights.append(Weights(model.to(device=device, dtype=dtype).eval().requires_grad_(False),
                               kind))
    run_dir = checkpoint.parent.parent
    info = {"kind": "checkpoint", "path": str(checkpoint.resolve()), "step": state.get("step"),
            "samples_seen": state.get("samples_seen"), "weights": kinds[0]}
    return Source(weights, setting, info, eval_dir(run_dir) / step_dir_name(state["step"]),
                  eval_dir(run_dir) / "fid_reference.npz")


def evaluate_weights(path: str | Path, cfg: EvalConfig, *, step: int | None = None,
                     out_dir: str | Path | None = None, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, overwrite: bool = False,
                     data_path: str = "") -> dict:
    """Evaluate the weights under ``path``; rank 0 writes ``OUT/eval.json``. Returns the
    result (on every rank). ``data_path`` (the CONFIG's data.path, for eval.holdout_shards)
    replaces the run's; an export records none."""
    device = torch.device(device)
    if out_dir and (Path(out_dir) / RESULT_NAME).exists() and not overwrite:
        raise FileExistsError(f"{Path(out_dir) / RESULT_NAME}: exists; pass --overwrite or "
                              "another --out")
    source = load_source(path, step, device, dtype, raw_loss="loss" in cfg.metrics)
    if data_path:
        source.setting.data_path = data_path
    out = Path(out_dir) if out_dir else source.default_out
    result_path = out / RESULT_NAME
    if result_path.exists() and not overwrite:
        raise FileExistsError(f"{result_path}: exists; pass --overwrite or another --out")
    evaluator = Evaluator(cfg, source.setting, device=device, stats_path=source.default_stats)
    metrics: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for weights in source.weights:
        fn = cast_inputs(make_model_fn(weights.model, source.setting.arch), dtype)
        with torch.no_grad():
            if "loss" in cfg.metrics:
                loss = evaluator.loss(fn)
                counts["loss_samples"] = loss.pop("loss_samples")
                suffix = "" if weights is source.weights[0] else f"_{weights.kind}"
                metrics.update({f"loss{suffix}{k[4:]}": v for k, v in loss.items()})
            if weights is source.weights[0]:
                sampled = evaluator.sample_metrics(fn)
                for key in ("num_samples", "generated_per_rank", "fid_reference_count"):
                    if key in sampled:
                        counts[key] = sampled.pop(key)
                metrics.update(sampled)
    result = {"metrics": metrics, "counts": counts, "weights": source.info,
              "settings": evaluator.settings()}
    if world()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(result_path, json.dumps(result, indent=1) + "\n")
        log.info("wrote %s", result_path)
    result["path"] = str(result_path)
    return result


def _stats_of(source: str, inception, batch_size: int, device: torch.device) -> FeatureStats:
    """Statistics of an image folder / shard pattern (features computed by every rank), or
    of a cached ``.npz`` (pytorch-fid's or ours)."""
    if source.endswith(".npz"):
        stats = load_stats(source)
        check_cached(stats, Path(source), inception.dims, inception.identity,
                     stats.meta.get("preprocessing", preprocessing(None)))
        return stats
    features, skipped = image_source_features(source, inception, batch_size, device)
    stats = feature_stats(features, {"source": source, "skipped": skipped}, what=source)
    stats.meta["skipped"] = skipped
    return stats


def fid_between(real: str, fake: str, *, inception: str | None = None, dims: int = 2048,
                batch_size: int = 50, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The FID between two image sets, as pytorch-fid computes it (no resizing before
    Inception). Each may be an image folder, a shard pattern or a ``.npz`` of statistics."""
    device = torch.device(device)
    network = build_inception(inception, dims, device)
    sets = {name: _stats_of(src, network, batch_size, device)
            for name, src in (("real", real), ("fake", fake))}
    value = None
    if world()[0] == 0:
        value = fid_of(sets["real"], sets["fake"])
    result = {"fid": broadcast_from_main(value)}
    for name, src in (("real", real), ("fake", fake)):
        result[name] = {"source": src, "count": sets[name].count,
                        "skipped": int(sets[name].meta.get("skipped", 0))}
    result["settings"] = {"inception": inception or "pytorch-fid URL",
                          "inception_weights": network.identity, "dims": dims,
                          "batch_size": batch_size, "preprocessing": preprocessing(None),
                          "world_size": world()[1]}
    return result


def json_ready(value: Any) -> Any:
    """numpy scalars -> Python numbers (for json.dumps)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value
