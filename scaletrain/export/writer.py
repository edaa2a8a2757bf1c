"""Checkpoint -> one consolidated state dict -> an export directory (see :mod:`.layout`).

Consolidation (:mod:`.consolidate`) reassembles EMA shards or the ZeRO fp32 master weights of
any stage and world size on the CPU; no GPU and no process group are needed. This module
checks the result against the model the run's config builds, casts it, and writes it in our
layout or diffusers'.

Every directory is written under a temporary name next to ``out`` and renamed at the end, so
a crash never leaves a half-written export that looks complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from scaletrain import __version__
from scaletrain.core.config_base import ConfigError, from_dict, load_yaml, to_dict
from scaletrain.core.files import readable_per_umask
from scaletrain.core.run_dir import (
    CHECKPOINTS,
    MARKER,
    CheckpointGone,
    pruned_message,
    read_manifest,
    read_state,
    reading,
    resolve_checkpoint,
)
from scaletrain.data.loader.config import DataConfig
from scaletrain.data.preprocess.config import PreprocessConfig
from scaletrain.data.shard_format import read_index
from scaletrain.diffusion.config import DiffusionConfig
from scaletrain.export.consolidate import consolidate_ema, consolidate_model
from scaletrain.export.layout import (
    CONFIG_NAME,
    DIFFUSERS,
    DIFFUSERS_WEIGHTS_NAME,
    DTYPES,
    EXPORT_FORMAT,
    FORMAT_VERSION,
    LAYOUTS,
    SAFETENSORS,
    SIDECAR_NAME,
    WEIGHT_KINDS,
    WEIGHTS_NAME,
    ExportError,
)
from scaletrain.export.reader import model_config_from_dict
from scaletrain.models import build_model
from scaletrain.models.config import ModelConfig
from scaletrain.models.diffusers_compat import (
    diffusers_class_name,
    diffusers_config,
    diffusers_extra_state,
    to_diffusers_state_dict,
    unsupported_options,
)

log = logging.getLogger(__name__)

@dataclass
class ExportResult:
    out_dir: Path
    layout: str
    weights: str
    dtype: str
    step: int | None
    checkpoint: Path | None
    num_params: int
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs


@dataclass
class RunSections:
    """The sections of a run's config that an export records (export needs no more of it)."""

    model: ModelConfig
    diffusion: DiffusionConfig
    preprocess: PreprocessConfig
    data: DataConfig
    ema: dict[str, Any]


def run_sections(data: dict[str, Any]) -> RunSections:
    """Parse the export-relevant sections of a resolved run config (a dict from YAML)."""
    return RunSections(
        model=model_config_from_dict(data.get("model", {})),
        diffusion=from_dict(DiffusionConfig, data.get("diffusion", {}), "diffusion"),
        preprocess=from_dict(PreprocessConfig, data.get("preprocess", {}), "preprocess"),
        data=from_dict(DataConfig, data.get("data", {}), "data"),
        ema=dict(data.get("ema", {})),
    )


def load_run_config(checkpoint: Path) -> RunSections:
    """The resolved config saved with a checkpoint (or, failing that, with its run)."""
    candidates = [checkpoint / "config.yaml", checkpoint.parent.parent / "config.yaml"]
    for path in candidates:
        if path.is_file():
            try:
                return run_sections(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
            except (ConfigError, yaml.YAMLError) as exc:
                raise ExportError(f"{path}: {exc}") from exc
    raise ExportError(
        f"{checkpoint}: no config.yaml in the checkpoint or its run directory; the model "
        "config is needed to check and describe the weights"
    )


def check_diffusers_exportable(model_cfg: ModelConfig) -> None:
    """Refuse, naming the options, a model whose forward diffusers' class cannot reproduce."""
    problems = unsupported_options(model_cfg)
    if problems:
        raise ExportError(
            f"cannot export to the diffusers layout: model option(s) {', '.join(problems)} "
            f"have no equivalent in diffusers' {diffusers_class_name(model_cfg)}; "
            "use --format safetensors (scaletrain sample loads it)"
        )


def check_state_dict(state: Mapping[str, torch.Tensor], model_cfg: ModelConfig, where: str) -> int:
    """Names and shapes must be exactly the model's (built on the meta device: no memory).
    Returns the number of parameters."""
    expected = build_model(model_cfg, device="meta").state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise ExportError(
            f"{where}: the weights do not match the run's model config ({model_cfg.arch}): "
            + "; ".join(parts)
        )
    return sum(v.numel() for v in state.values())


def dataset_encoders(data_path: str) -> dict[str, Any] | None:
    """The encoders' identities recorded in the training data's index, if it is readable."""
    if not data_path:
        return None
    try:
        index = read_index(data_path)
    except (OSError, ValueError):
        return None
    return {k: index.get(k) for k in ("image_encoder", "text_encoder")}


def encoder_warnings(cfg: RunSections, dataset: dict[str, Any] | None) -> list[str]:
    """Where the preprocess section that will rebuild the encoders disagrees with the data the
    model was trained on, or with the model's own widths. Recorded, not refused: the section
    can be corrected at sampling time (``scaletrain sample --encoders``)."""
    out: list[str] = []
    pre, model = cfg.preprocess, cfg.model
    if dataset and dataset.get("image_encoder"):
        image = dataset["image_encoder"]
        if image.get("kind") != pre.image_encoder.kind:
            out.append(
                f"preprocess.image_encoder.kind is {pre.image_encoder.kind!r} but the training "
                f"data was encoded with {image.get('kind')!r}"
            )
        channels = image.get("latent_channels")
        if channels is not None and channels != model.in_channels:
            out.append(f"the data's latents have {channels} channels, model.in_channels is "
                       f"{model.in_channels}")
    if dataset and dataset.get("text_encoder"):
        text = dataset["text_encoder"]
        if text.get("preset") != pre.text_encoder.preset:
            out.append(
                f"preprocess.text_encoder.preset is {pre.text_encoder.preset!r} but the training "
                f"data was encoded with {text.get('preset')!r}"
            )
    return out


def export_metadata(
    cfg: RunSections,
    layout: str,
    weights: str,
    dtype: str,
    provenance: Mapping[str, Any],
    warnings: list[str],
    dataset: dict[str, Any] | None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "weights_file": WEIGHTS_NAME if layout == SAFETENSORS else DIFFUSERS_WEIGHTS_NAME,
    }
    if layout == DIFFUSERS:
        meta["diffusers_class"] = diffusers_class_name(cfg.model)
    meta.update(
        model=to_dict(cfg.model),
        diffusion=to_dict(cfg.diffusion),
        data={"max_text_tokens": cfg.data.max_text_tokens},
        preprocess=to_dict(cfg.preprocess),
        dataset_encoders=dataset,
        provenance={
            **provenance,
            "weights": weights,
            "dtype": dtype,
            "ema": to_dict(cfg.ema) if weights == "ema" else None,
            "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "scaletrain_version": __version__,
        },
        warnings=list(warnings),
    )
    return meta


# --------------------------------------------------------------------------- writing


def _cast(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _diffusers_files(
    state: Mapping[str, torch.Tensor], model_cfg: ModelConfig, dtype: torch.dtype, staging: Path
) -> None:
    """diffusers' weights file and config.json, checked against diffusers' own class."""
    weights = to_diffusers_state_dict(dict(state), model_cfg)
    weights.update(diffusers_extra_state(model_cfg))
    weights = _cast(weights, dtype)
    config = {"_class_name": diffusers_class_name(model_cfg)}
    # diffusers is imported only for this layout: it adds ~4 s to every process that imports
    # it (measured on the 2-core CI machine), and training imports this package.
    import diffusers

    config["_diffusers_version"] = diffusers.__version__
    _check_against_diffusers(weights, model_cfg)
    config.update(diffusers_config(model_cfg))
    save_file(weights, str(staging / DIFFUSERS_WEIGHTS_NAME), metadata={"format": "pt"})
    _write_json(staging / CONFIG_NAME, config)


def _check_against_diffusers(weights: Mapping[str, torch.Tensor], model_cfg: ModelConfig) -> None:
    """Build diffusers' class on the meta device and compare names and shapes: a file that
    ``from_pretrained`` would load with missing or unexpected keys is never written."""
    import diffusers  # only for this layout (see _diffusers_files)

    cls = getattr(diffusers, diffusers_class_name(model_cfg))
    with torch.device("meta"):
        reference = cls(**diffusers_config(model_cfg)).state_dict()
    missing = sorted(set(reference) - set(weights))
    unexpected = sorted(set(weights) - set(reference))
    wrong = [k for k in set(reference) & set(weights) if reference[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        raise ExportError(
            f"internal: the diffusers layout does not match {cls.__name__}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {sorted(wrong)[:5]}"
        )


_EXPORT_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME, SIDECAR_NAME})


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_target(out: str | Path, sources: tuple[Path, ...] = (), overwrite: bool = False
                        ) -> None:
    """Refuse an --out that could destroy what it did not create.

    An export is never written into a run directory (a folder holding ``checkpoints/``) or
    anything inside one, nor over or around a folder it reads (``sources``); ``--overwrite``
    only replaces a folder that holds nothing but the files an export writes."""
    out = Path(out).expanduser().resolve()
    for source in sources:
        source = Path(source).expanduser().resolve()
        if _inside(out, source) or _inside(source, out):
            raise ExportError(
                f"--out {out}: overlaps the export's input {source}; give a folder outside it")
    for folder in (out, *out.parents):
        if (folder / CHECKPOINTS).is_dir():
            raise ExportError(
                f"--out {out}: is inside the run directory {folder}; an export never writes "
                f"into a run, give a folder outside it")
    if overwrite and out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _EXPORT_FILES)
        if foreign:
            raise ExportError(
                f"--out {out}: --overwrite replaces only an earlier export, and this folder "
                f"also holds {', '.join(foreign[:5])}; give a new folder")


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite and out.is_dir():
            shutil.rmtree(out)
        elif overwrite:
            out.unlink()
        else:
            raise ExportError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    staging.rename(out)


def export_state_dict(
    state: Mapping[str, torch.Tensor],
    cfg: RunSections,
    out_dir: str | Path,
    *,
    layout: str = SAFETENSORS,
    weights: str = "ema",
    dtype: str = "fp32",
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``state`` (our parameter names, any float dtype) as an export of ``cfg``'s model.

    ``cfg`` supplies the model, diffusion, data and preprocess sections recorded with it.
    """
    if layout not in LAYOUTS:
        raise ExportError(f"--format: got {layout!r}; allowed: {', '.join(LAYOUTS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype: got {dtype!r}; allowed: {', '.join(DTYPES)}")
    if weights not in WEIGHT_KINDS:
        raise ExportError(f"--weights: got {weights!r}; allowed: {', '.join(WEIGHT_KINDS)}")
    if layout == DIFFUSERS:
        check_diffusers_exportable(cfg.model)
    provenance = dict(provenance or {})
    num_params = check_state_dict(state, cfg.model, str(provenance.get("checkpoint", "weights")))
    dataset = dataset_encoders(cfg.data.path)
    warnings = encoder_warnings(cfg, dataset)
    for w in warnings:
        log.warning("%s", w)
    meta = export_metadata(cfg, layout, weights, dtype, provenance, warnings, dataset)

    out = Path(out_dir)
    check_export_target(out, overwrite=overwrite)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        torch_dtype = DTYPES[dtype]
        if layout == SAFETENSORS:
            header = {"format": "pt", "scaletrain_weights": weights, "scaletrain_dtype": dtype}
            if provenance.get("step") is not None:
                header["scaletrain_step"] = str(provenance["step"])
            save_file(_cast(state, torch_dtype), str(staging / WEIGHTS_NAME), metadata=header)
            _write_json(staging / CONFIG_NAME, meta)
        else:
            _diffusers_files(state, cfg.model, torch_dtype, staging)
            _write_json(staging / SIDECAR_NAME, meta)
        files = sorted(p.name for p in staging.iterdir())
        for path in (staging, *staging.iterdir()):
            readable_per_umask(path)
        _publish(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s weights (%s, %s, %d parameters) to %s", weights, layout, dtype,
             num_params, out)
    return ExportResult(
        out_dir=out,
        layout=layout,
        weights=weights,
        dtype=dtype,
        step=provenance.get("step"),
        checkpoint=Path(provenance["checkpoint"]) if provenance.get("checkpoint") else None,
        num_params=num_params,
        files=files,
        warnings=warnings,
    )


def consolidated_weights(checkpoint: Path, weights: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a complete checkpoint directory: the EMA or the raw master weights.

    Read under :func:`reading`, so a training that prunes checkpoints leaves this one until
    the read is done; one that was pruned before, or a missing shard, is one clear error."""
    try:
        with reading(checkpoint):
            if weights != "ema" or (checkpoint / "ema").is_dir():  # else: "has no EMA"
                check_files_present(checkpoint, "ema/" if weights == "ema" else "ds/")
            if weights == "ema":
                return consolidate_ema(checkpoint)
            return consolidate_model(checkpoint)
    except CheckpointGone as exc:
        raise ExportError(str(exc)) from exc
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        if not (checkpoint / MARKER).is_file():  # removed mid-read by an older trainer
            raise ExportError(pruned_message(checkpoint)) from exc
        no_ema = weights == "ema" and not (checkpoint / "ema").is_dir()
        hint = " (try --weights raw)" if no_ema else ""
        raise ExportError(f"{exc}{hint}") from exc


def check_files_present(ckpt: Path, prefix: str) -> None:
    """Every file under ``prefix`` the checkpoint's manifest lists is there at its size
    (a stat each; the full checksums are the resume's job)."""
    manifest = read_manifest(ckpt) or {}
    for rel, meta in sorted(manifest.items()):
        path = ckpt / rel
        if not rel.startswith(prefix):
            continue
        if not path.is_file():
            kind = "EMA shard" if prefix == "ema/" else "file"
            raise ExportError(f"{path}: {kind} missing, the checkpoint is damaged; export "
                              "another --step")
        if path.stat().st_size != meta.get("size"):
            raise ExportError(f"{path}: {path.stat().st_size} bytes, {meta.get('size')} "
                              "expected; the checkpoint is damaged; export another --step")


def export_checkpoint(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    weights: str = "ema",
    layout: str = SAFETENSORS,
    dtype: str = "fp32",
    encoders: str | Path | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export one checkpoint of a run (the newest complete one, or ``step``).

    ``run_dir`` may also be a ``step_*`` checkpoint directory itself. ``encoders`` is an
    optional YAML whose preprocess section replaces the run's as the record of which image
    and text encoders go with the model (for runs trained on data preprocessed elsewhere).
    """
    if weights not in WEIGHT_KINDS:
        raise ExportError(f"--weights: got {weights!r}; allowed: {', '.join(WEIGHT_KINDS)}")
    try:
        checkpoint = resolve_checkpoint(run_dir, step)
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from exc
    # Before the (slow) consolidation: the run itself is never a target.
    check_export_target(out_dir, (Path(run_dir), checkpoint), overwrite)
    cfg = load_run_config(checkpoint)
    if encoders is not None:
        cfg.preprocess = from_dict(PreprocessConfig, load_yaml(encoders).get("preprocess", {}),
                                   "preprocess")
    if layout == DIFFUSERS:
        check_diffusers_exportable(cfg.model)  # before the (slow) consolidation
    state_json = read_state(checkpoint)
    log.info("consolidating %s weights of %s (world size %s, ZeRO-%s)", weights, checkpoint,
             state_json.get("world_size"), state_json.get("zero_stage"))
    state = consolidated_weights(checkpoint, weights)
    provenance = {
        "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": str(checkpoint.resolve()),
        "step": state_json.get("step"),
        "samples_seen": state_json.get("samples_seen"),
        "world_size": state_json.get("world_size"),
        "zero_stage": state_json.get("zero_stage"),
        "ema_updates": state_json.get("ema_updates"),
    }
    return export_state_dict(
        state, cfg, out_dir, layout=layout, weights=weights, dtype=dtype,
        provenance=provenance, overwrite=overwrite,
    )
