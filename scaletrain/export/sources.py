"""Weights a new run starts from (``model.init_from``), in every released layout, read one
parameter (or a row range of one) at a time.

``open_weight_source(model_cfg) -> WeightSource`` recognises what ``model_cfg.init_from``
names and maps it onto the model ``model_cfg`` builds:

==========================  ===============================================================
kind                        what it is (key map: :mod:`scaletrain.models.key_maps`)
==========================  ===============================================================
``diffusers``               a diffusers model folder (``save_pretrained``; one file or a
                            sharded ``*.safetensors.index.json``; fp32/fp16/bf16), or a
                            pipeline folder's ``unet/`` (U-Net) or ``transformer/`` (MMDiT);
                            also ``scaletrain export --format diffusers`` and hub ids
``sdxl-single-file``        SDXL's original file (``sd_xl_base_1.0.safetensors``):
                            ``model.diffusion_model.*`` in sgm's names
``sd3-single-file``         SD3/SD3.5's original file: ``model.diffusion_model.joint_blocks.*``
``safetensors``             one .safetensors of our (= diffusers') names, e.g. an export's
                            ``model.safetensors``
``scaletrain-export``       a ``scaletrain export`` directory in our layout
``scaletrain-checkpoint``   a run directory (its newest checkpoint) or ``checkpoints/step_N``:
                            the fp32 master weights (``init_weights=raw``, read from the
                            checkpoint's universal form) or the EMA (``ema``)
==========================  ===============================================================

Nothing is read in full: safetensors files are opened lazily (memory-mapped) and each tensor,
or the rows of it a ZeRO-3 rank owns, is read when asked for. Pickled formats (.ckpt, .bin)
are refused: unpickling runs code. A hub id is fetched with ``huggingface_hub`` into its cache
(the weight files the model needs only) and then read as a local folder.

Opening a source also checks it against the model (names, shapes, and the source's own
config where it has one); :meth:`WeightSource.check` turns what it found into one error.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import snapshot_download
from safetensors import safe_open

from scaletrain.core.config_base import ConfigError
from scaletrain.core.run_dir import (
    CHECKPOINTS,
    CONFIG,
    is_complete,
    rank_files,
    read_state,
    resolve_checkpoint,
)
from scaletrain.export.consolidate import (
    DS_TAG,
    frozen_shapes,
    frozen_value,
    load_ema_shard,
    model_states,
)
from scaletrain.export.layout import (
    CONFIG_NAME,
    DIFFUSERS,
    EXPORT_FORMAT,
    SIDECAR_NAME,
    WEIGHTS_NAME,
    ExportError,
    read_metadata,
)
from scaletrain.models import build_model
from scaletrain.models.config import MMDiTConfig, ModelConfig, UNetConfig, architecture_difference
from scaletrain.models.diffusers_compat import (
    diffusers_class_name,
    diffusers_config_difference,
    diffusers_extra_shapes,
    from_diffusers_names,
)
from scaletrain.models.key_maps import (
    SINGLE_FILE_PREFIX,
    KeyMap,
    Piece,
    identity_map,
    sd3_extra_shapes,
    sd3_key_map,
    sgm_unet_key_map,
)

log = logging.getLogger(__name__)

DIFFUSERS_KIND = "diffusers"
SDXL_FILE = "sdxl-single-file"
SD3_FILE = "sd3-single-file"
STATE_DICT = "safetensors"
EXPORT = "scaletrain-export"
CHECKPOINT = "scaletrain-checkpoint"

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # diffusers' weights file stem
PIPELINE_INDEX = "model_index.json"
PIPELINE_SUBFOLDER = {"unet": "unet", "mmdit": "transformer"}
MAX_REPORT_LINES = 20  # an architecture mismatch is one error of at most this many lines
# What a single file holds besides the diffusion model: VAE, text encoders, an EMA copy.
OTHER_MODELS = ("first_stage_model.", "conditioner.", "cond_stage_model.", "text_encoders.",
                "model_ema.")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class InitSourceError(ConfigError):
    """``model.init_from`` cannot initialise this model: what and why, in a few lines."""


# ----------------------------------------------------------------------------- readers


class SafetensorsFiles:
    """Tensors of one or more .safetensors files (a sharded set): only the headers are read
    up front; a tensor, or rows of it, when asked for. Each read maps the file, copies out
    the bytes asked for and unmaps it again, so the pages read do not stay in this process's
    resident memory (a header parse per read: microseconds)."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.files = [Path(f) for f in files]
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.metadata: dict[str, str] = {}
        for path in self.files:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    self.metadata.update(handle.metadata() or {})
                    for key in handle.keys():
                        self.where[key] = path
                        self.shapes[key] = tuple(handle.get_slice(key).get_shape())
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise InitSourceError(f"model.init_from: {path}: not a readable safetensors "
                                      f"file ({exc})") from None

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        with safe_open(str(self.where[key]), framework="pt", device="cpu") as handle:
            if start is None or not self.shapes[key]:
                return handle.get_tensor(key).clone()
            return handle.get_slice(key)[start:stop].clone()

    def close(self) -> None:
        pass  # nothing stays open


class CheckpointTensors:
    """A scaletrain checkpoint's weights, one parameter at a time, in fp32.

    ``raw``: the fp32 master weights, from the checkpoint converted to DeepSpeed's universal
    form (one file per parameter; the trainer converts it into the new run's directory and
    sets :attr:`universal`). ``ema``: assembled from the EMA shards (memory-mapped).
    Frozen parameters (``model.trainable``) have neither and come from the saved module
    states, as training kept them.
    """

    def __init__(self, ckpt: Path, weights: str) -> None:
        self.ckpt, self.weights = ckpt, weights
        self.universal: Path | None = None
        try:
            self._states = model_states(ckpt)
        except FileNotFoundError as exc:
            raise InitSourceError(f"model.init_from: {exc}") from None
        # ZeRO-1/2/3 save optimizer shards with the fp32 masters; ZeRO-0 (bf16) only the
        # module, which then holds the weights as trained (what its export reads too).
        self.zero = any((ckpt / DS_TAG).glob("*optim_states.pt"))
        self.shapes: dict[str, tuple[int, ...]] = {}
        if self.zero:
            for group in self._states[0]["param_shapes"]:
                self.shapes.update({k: tuple(v) for k, v in group.items()})
        else:
            buffers = set(self._states[0].get("buffer_names") or [])
            self.shapes = {k: tuple(v.shape) for k, v in self._states[0]["module"].items()
                           if k not in buffers}
        self.frozen = frozen_shapes(self._states)
        self.shapes.update(self.frozen)
        self.files = sorted((ckpt / DS_TAG).glob("*model_states.pt"))
        self._ema: list[dict] = []
        self._ema_index: dict[str, list[tuple[int, int]]] = {}
        if weights == "ema":
            if not (ckpt / "ema").is_dir():
                raise InitSourceError(f"model.init_weights=ema: {ckpt} has no EMA (the run "
                                      "had ema.enabled=false); use model.init_weights=raw")
            paths = rank_files(ckpt, "ema")
            self.files += paths
            self._ema = [load_ema_shard(p) for p in paths]
            for s, shard in enumerate(self._ema):
                for i, meta in enumerate(shard["fragments"]):
                    self._ema_index.setdefault(meta["name"], []).append((s, i))
        else:
            self.files += sorted((ckpt / DS_TAG).glob("*optim_states.pt"))

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        shape = self.shapes[key]
        if key in self.frozen:
            flat = frozen_value(self._states, key)
        elif self.weights == "ema":
            flat = self._ema_param(key)
        else:
            flat = self._master(key)
        full = flat.reshape(shape)
        return full if start is None else full[start:stop]

    def _numel(self, key: str) -> int:
        return int(torch.Size(self.shapes[key]).numel())


    def _ema_param(self, key: str) -> torch.Tensor:
        out = torch.empty(self._numel(key), dtype=torch.float32)
        covered = 0
        for s, i in self._ema_index.get(key, []):
            meta = self._ema[s]["fragments"][i]
            out[meta["offset"]:meta["offset"] + meta["numel"]] = self._ema[s]["tensors"][i]
            covered += meta["numel"]
        if covered != out.numel():
            raise InitSourceError(f"model.init_from: {self.ckpt}: the EMA shards do not cover "
                                  f"{key}")
        return out

    def _master(self, key: str) -> torch.Tensor:
        if not self.zero:
            return self._states[0]["module"][key].float()
        if self.universal is None:
            raise RuntimeError("CheckpointTensors.universal is not set (convert first)")
        path = self.universal / "zero" / key / "fp32.pt"
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)["param"]

    def close(self) -> None:
        self._states, self._ema = [], []


# ----------------------------------------------------------------------------- the source


@dataclass
class WeightSource:
    """``model.init_from`` resolved, mapped onto the model, and checked against it."""

    spec: str  # model.init_from as written
    path: Path  # the local file or folder read (a hub id's snapshot folder)
    kind: str
    reader: SafetensorsFiles | CheckpointTensors
    key_map: KeyMap  # our parameter -> pieces of source tensors, for those the source has
    shapes: dict[str, tuple[int, ...]]  # every parameter of the model, with its shape
    missing: list[str] = field(default_factory=list)  # our parameters the source lacks
    unexpected: list[str] = field(default_factory=list)  # source tensors the model lacks
    mismatched: list[str] = field(default_factory=list)  # "name: source (..), model (..)"
    ignored: int = 0  # tensors of other models in the file (VAE, text encoders)
    config_difference: tuple[str, Any, Any] | None = None
    checkpoint: Path | None = None  # for a scaletrain run or checkpoint
    details: dict[str, Any] = field(default_factory=dict)  # export / checkpoint provenance
    model_config: Any = None  # what it was mapped onto (for messages)

    @property
    def files(self) -> list[Path]:
        return list(self.reader.files)

    def read(self, name: str, start: int | None = None, stop: int | None = None
             ) -> torch.Tensor:
        """Rows ``[start, stop)`` (dim 0; all when None) of our parameter ``name``, in fp32
        (an upcast, so exact). Reads only the source rows needed."""
        pieces, shape = self.key_map[name], self.shapes[name]
        if start is None:
            parts = [self.reader.read(p.key, p.start, p.stop) for p in pieces]
            return (parts[0] if len(parts) == 1 else torch.cat(parts)).float().reshape(shape)
        parts, offset = [], 0
        for p in pieces:
            rows = (p.stop - p.start) if p.start is not None else shape[0]
            a, b = max(start, offset), min(stop, offset + rows)
            if a < b:
                base = (p.start or 0) - offset
                parts.append(self.reader.read(p.key, base + a, base + b))
            offset += rows
        value = parts[0] if len(parts) == 1 else torch.cat(parts)
        return value.float().reshape((stop - start, *shape[1:]))

    def problems(self, strict: bool) -> list[list[str]]:
        """What stops this source from initialising the model, by kind (shape mismatches,
        then missing and unexpected tensors); the last two only count when ``strict``."""
        kinds = [[f"shape       {m}" for m in self.mismatched]]
        if strict:
            kinds.append([f"missing     {name}{self._looked_for(name)}"
                          for name in self.missing])
            kinds.append([f"unexpected  {key}" for key in self.unexpected])
        return [k for k in kinds if k]

    def _looked_for(self, name: str) -> str:
        theirs = self._their_name(name)
        return f" (looked for {theirs})" if theirs and theirs != name else ""

    def _their_name(self, name: str) -> str | None:
        if self.kind == SDXL_FILE:
            found = sgm_unet_key_map(self.model_config, [name])
        elif self.kind == SD3_FILE:
            found = sd3_key_map(self.model_config, [name], self.details.get("prefix", ""))
        else:
            return None
        return found[name][0].key if name in found else None

    def check(self, strict: bool) -> list[str]:
        """Raise :class:`InitSourceError` (at most :data:`MAX_REPORT_LINES` lines) when the
        source does not fit the model; return the warnings to log when it does."""
        kinds = self.problems(strict)
        diff = self.config_difference
        config_line = (f"config      {diff[0]}: source {diff[1]!r}, model {diff[2]!r}"
                       if diff else None)
        if kinds or (diff and strict):
            counts = (f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                      f"{len(self.mismatched)} shape mismatch(es)")
            head = (f"model.init_from: {self.spec} ({self.kind}) does not fit the model "
                    f"config (model.arch={self.model_config.arch}): {counts}")
            fix = ("Make the model section match the source (the model preset your config "
                   "names under base:, e.g. configs/models/sdxl_unet.yaml for SDXL base, "
                   "mmdit_2b.yaml for SD3 Medium, mmdit_8b.yaml for SD3.5 Large)"
                   + (", or set model.init_strict=false to load what fits and keep the "
                      "model's own init for the rest" if not self.mismatched else "") + ".")
            body = ([config_line] if config_line else []) + _interleave(
                kinds, MAX_REPORT_LINES - 3 - bool(config_line))
            raise InitSourceError("\n".join([head, *("  " + b for b in body), fix]))
        warnings = []
        if diff:
            warnings.append(f"the source's config differs: {config_line.split(None, 1)[1]}")
        if self.missing:
            warnings.append(f"{len(self.missing)} parameter(s) not in the source keep their "
                            f"init: {', '.join(self.missing[:10])}"
                            + (" ..." if len(self.missing) > 10 else ""))
        if self.unexpected:
            warnings.append(f"{len(self.unexpected)} source tensor(s) not loaded: "
                            f"{', '.join(self.unexpected[:10])}"
                            + (" ..." if len(self.unexpected) > 10 else ""))
        return warnings

    def counts(self) -> dict[str, int]:
        return {"loaded": len(self.key_map), "missing": len(self.missing),
                "unexpected": len(self.unexpected), "ignored": self.ignored,
                "source_tensors": len(self.reader.shapes)}

    def close(self) -> None:
        self.reader.close()


def _interleave(kinds: list[list[str]], room: int) -> list[str]:
    """Up to ``room`` lines taking from each kind in turn, then how many were left out."""
    total = sum(len(k) for k in kinds)
    if total <= room:
        return [line for kind in kinds for line in kind]
    shown: list[str] = []
    for i in range(room - 1):
        for kind in kinds:
            if i < len(kind) and len(shown) < room - 1:
                shown.append(kind[i])
    return shown + [f"... and {total - len(shown)} more"]


def open_weight_source(model_cfg: ModelConfig) -> WeightSource:
    """Resolve ``model_cfg.init_from``, map it onto the model and compare (no weights read).

    Raises :class:`InitSourceError` for a source that cannot be read or used with the other
    init keys; a source that does not fit is reported by :meth:`WeightSource.check`.
    """
    spec = str(model_cfg.init_from)
    path = resolve_spec(spec, model_cfg)
    expected = {n: tuple(p.shape) for n, p in
                build_model(model_cfg, device="meta").named_parameters()}
    if path.is_file():
        source = _open_file(spec, path, model_cfg, expected)
    else:
        source = _open_folder(spec, path, model_cfg, expected)
    source.model_config = model_cfg
    if source.kind != CHECKPOINT:
        for key in ("init_optimizer", "init_keep_step"):
            if getattr(model_cfg, key):
                raise InitSourceError(f"model.{key}: needs a scaletrain run or checkpoint as "
                                      f"model.init_from; {spec} is a {source.kind} source")
        if model_cfg.init_weights != "raw":
            raise InitSourceError(f"model.init_weights={model_cfg.init_weights}: applies to a "
                                  f"scaletrain run or checkpoint; {spec} is a {source.kind} "
                                  "source (its weights are what they are)")
    return source


# ----------------------------------------------------------------------------- resolving


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.fullmatch(spec)) and not spec.endswith(".safetensors")


def resolve_spec(spec: str, model_cfg: ModelConfig) -> Path:
    """The local file or folder ``spec`` names: a path, or a hub id fetched into the cache."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(spec):
        return fetch_from_hub(spec, model_cfg.arch)
    raise InitSourceError(f"model.init_from: {spec}: no such file or directory (nor a "
                          "Hugging Face hub id of the form org/name)")


def fetch_from_hub(repo_id: str, arch: str) -> Path:
    """Download what initialising ``arch`` needs from hub repo ``repo_id`` (a pipeline's
    unet/ or transformer/, or a model repo's own files; safetensors only) into the hub cache
    and return the snapshot folder. The cache is reused; HF_TOKEN gives access to gated repos.
    """
    patterns = [PIPELINE_INDEX, CONFIG_NAME, SIDECAR_NAME, WEIGHTS_NAME]
    for folder in ("", PIPELINE_SUBFOLDER.get(arch, "") + "/"):
        patterns += [f"{folder}{CONFIG_NAME}", f"{folder}{DIFFUSERS_WEIGHTS}.safetensors",
                     f"{folder}{DIFFUSERS_WEIGHTS}.safetensors.index.json",
                     f"{folder}{DIFFUSERS_WEIGHTS}-*-of-*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=sorted(set(patterns))))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all one answer
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InitSourceError(
            f"model.init_from: {repo_id!r} is not a local path, and fetching it from the "
            f"Hugging Face hub failed ({type(exc).__name__}: {reason}); download it where "
            "there is network (huggingface-cli download " + repo_id + ") and give the local "
            "folder, or set HF_TOKEN for a gated repo") from None


# ----------------------------------------------------------------------------- files


def _open_file(spec: str, path: Path, cfg: ModelConfig, expected) -> WeightSource:
    if path.suffix != ".safetensors":
        raise InitSourceError(
            f"model.init_from: {path}: only .safetensors files are read (unpickling "
            f"{path.suffix or 'this file'} can run code); convert it with safetensors first")
    reader = SafetensorsFiles([path])
    keys = list(reader.shapes)
    if any(k.startswith(SINGLE_FILE_PREFIX + "joint_blocks.") or k.startswith("joint_blocks.")
           for k in keys):
        prefix = SINGLE_FILE_PREFIX if any(k.startswith(SINGLE_FILE_PREFIX) for k in keys) else ""
        _require_arch(cfg, MMDiTConfig, spec, "an SD3/SD3.5 single file")
        key_map = sd3_key_map(cfg, expected, prefix)
        source = _mapped(spec, path, SD3_FILE, reader, key_map, expected,
                         model_keys=[k for k in keys if k.startswith(prefix)
                                     and not k.startswith(OTHER_MODELS)],
                         extras=sd3_extra_shapes(cfg, prefix))
        source.details["prefix"] = prefix
        return source
    if any(k.startswith(SINGLE_FILE_PREFIX + "input_blocks.") for k in keys):
        _require_arch(cfg, UNetConfig, spec, "an SDXL (sgm) single file")
        key_map = sgm_unet_key_map(cfg, expected)
        return _mapped(spec, path, SDXL_FILE, reader, key_map, expected,
                       model_keys=[k for k in keys if k.startswith(SINGLE_FILE_PREFIX)])
    # A bare state dict in our names, which are diffusers' (an export's model.safetensors,
    # a diffusers weights file on its own).
    return _mapped(spec, path, STATE_DICT, reader, identity_map(from_diffusers_names(expected)),
                   expected, model_keys=keys, extras=diffusers_extra_shapes(cfg))


def _require_arch(cfg: ModelConfig, cls: type, spec: str, what: str) -> None:
    if not isinstance(cfg, cls):
        want = "unet" if cls is UNetConfig else "mmdit"
        raise InitSourceError(f"model.init_from: {spec} is {what}, a model.arch={want} "
                              f"model; the config builds model.arch={cfg.arch}. Use a "
                              f"{want} preset (configs/models/)")


# ----------------------------------------------------------------------------- folders


def _open_folder(spec: str, path: Path, cfg: ModelConfig, expected) -> WeightSource:
    if is_complete(path) or (path / CHECKPOINTS).is_dir():
        return _open_checkpoint(spec, path, cfg, expected)
    if (path / SIDECAR_NAME).is_file() or _is_our_export_config(path / CONFIG_NAME):
        return _open_export(spec, path, cfg, expected)
    if (path / PIPELINE_INDEX).is_file():
        sub = PIPELINE_SUBFOLDER.get(cfg.arch)
        if sub is None:
            raise _no_diffusers_counterpart(spec, cfg)
        if not (path / sub).is_dir():
            present = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise InitSourceError(
                f"model.init_from: {spec} is a diffusers pipeline without a {sub}/ folder "
                f"for model.arch={cfg.arch} (it has: {', '.join(present) or 'no folders'})")
        return _open_diffusers(spec, path / sub, cfg, expected)
    if (path / CONFIG_NAME).is_file():
        return _open_diffusers(spec, path, cfg, expected)
    raise InitSourceError(
        f"model.init_from: {spec}: not a weights folder scaletrain reads (a diffusers model "
        f"or pipeline folder, a scaletrain export, run or checkpoint); it has no "
        f"{CONFIG_NAME}, {PIPELINE_INDEX}, {SIDECAR_NAME} or {CHECKPOINTS}/")


def _no_diffusers_counterpart(spec: str, cfg: ModelConfig) -> InitSourceError:
    return InitSourceError(f"model.init_from: {spec} is a diffusers model; "
                           f"model.arch={cfg.arch} has no diffusers counterpart")


def _is_our_export_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def diffusers_weight_files(folder: Path, spec: str) -> list[Path]:
    """The safetensors files of a diffusers model folder: sharded (index) or one file;
    the full-precision ones unless only one variant (e.g. fp16) is there."""
    stem = DIFFUSERS_WEIGHTS
    for index in [folder / f"{stem}.safetensors.index.json",
                  *sorted(folder.glob(f"{stem}.safetensors.index.*.json"))]:
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    variants = sorted(folder.glob(f"{stem}.*.safetensors"))
    if len(variants) == 1:
        return variants
    if variants:
        raise InitSourceError(f"model.init_from: {spec}: several weight variants "
                              f"({', '.join(v.name for v in variants)}) and no "
                              f"{stem}.safetensors; keep the one to use")
    pickled = sorted(p.name for p in folder.glob(f"{stem}*.bin"))
    hint = (f" (only pickled {', '.join(pickled)}: re-save it with safetensors, e.g. "
            "diffusers' from_pretrained then save_pretrained)" if pickled else "")
    raise InitSourceError(f"model.init_from: {folder}: no {stem}.safetensors{hint}")


def _open_diffusers(spec: str, folder: Path, cfg: ModelConfig, expected,
                    kind: str = DIFFUSERS_KIND) -> WeightSource:
    if not isinstance(cfg, (UNetConfig, MMDiTConfig)):
        raise _no_diffusers_counterpart(spec, cfg)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InitSourceError(f"model.init_from: {folder / CONFIG_NAME}: unreadable "
                              f"({exc})") from None
    want = diffusers_class_name(cfg)
    if config.get("_class_name") not in (None, want):
        raise InitSourceError(
            f"model.init_from: {spec} holds a {config.get('_class_name')}; model.arch="
            f"{cfg.arch} builds a {want}. Use a "
            f"{'unet' if want == 'UNet2DConditionModel' else 'mmdit'}-style preset, or the "
            "pipeline folder (its matching subfolder is then used)")
    reader = SafetensorsFiles(diffusers_weight_files(folder, spec))
    source = _mapped(spec, folder, kind, reader, identity_map(from_diffusers_names(expected)),
                     expected, model_keys=list(reader.shapes), extras=diffusers_extra_shapes(cfg))
    source.config_difference = diffusers_config_difference(config, cfg)
    return source


def _open_export(spec: str, path: Path, cfg: ModelConfig, expected) -> WeightSource:
    try:
        meta = read_metadata(path)
    except ExportError as exc:
        raise InitSourceError(f"model.init_from: {exc}") from None
    if meta["layout"] == DIFFUSERS:
        source = _open_diffusers(spec, path, cfg, expected, kind=EXPORT)
    else:
        reader = SafetensorsFiles([path / meta.get("weights_file", WEIGHTS_NAME)])
        source = _mapped(spec, path, EXPORT, reader, identity_map(expected), expected,
                         model_keys=list(reader.shapes))
        source.config_difference = architecture_difference(meta.get("model", {}), cfg)
    prov = meta.get("provenance", {})
    source.details.update(layout=meta["layout"], weights=prov.get("weights"),
                          step=prov.get("step"), run_dir=prov.get("run_dir"))
    return source


def _open_checkpoint(spec: str, path: Path, cfg: ModelConfig, expected) -> WeightSource:
    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError as exc:
        raise InitSourceError(f"model.init_from: {exc}") from None
    reader = CheckpointTensors(ckpt, cfg.init_weights)
    source = _mapped(spec, ckpt, CHECKPOINT, reader, identity_map(expected), expected,
                     model_keys=list(reader.shapes))
    source.checkpoint = ckpt
    if cfg.init_optimizer and not reader.zero:
        raise InitSourceError(f"model.init_optimizer: {ckpt} was written under ZeRO-0, whose "
                              "optimizer state cannot be re-sliced; load its weights only "
                              "(model.init_optimizer=false)")
    config_path = ckpt / CONFIG
    if config_path.is_file():
        model = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("model", {})
        source.config_difference = architecture_difference(model, cfg)
    state = read_state(ckpt)
    source.details.update(weights=cfg.init_weights, step=state.get("step"),
                          samples_seen=state.get("samples_seen"),
                          world_size=state.get("world_size"),
                          zero_stage=state.get("zero_stage"))
    return source


# ----------------------------------------------------------------------------- mapping


def _mapped(spec: str, path: Path, kind: str, reader, key_map: KeyMap,
            expected: dict[str, tuple[int, ...]], model_keys: list[str],
            extras: dict[str, tuple[int, ...]] | None = None) -> WeightSource:
    """Compare ``key_map`` (what each parameter should be read from) with what the source
    holds: keep the parameters it can fill, list the rest."""
    shapes = reader.shapes
    # A tensor the map slices (SD3's fused q, k, v) must have exactly the rows it divides.
    sliced_rows: dict[str, int] = {}
    for pieces in key_map.values():
        for p in pieces:
            if p.stop is not None:
                sliced_rows[p.key] = max(sliced_rows.get(p.key, 0), p.stop)
    found: KeyMap = {}
    missing, mismatched, used = [], [], set()
    for name, shape in expected.items():
        pieces = key_map.get(name)
        if not pieces or any(p.key not in shapes for p in pieces):
            missing.append(name)
            continue
        used.update(p.key for p in pieces)
        implied = _implied_shape(pieces, shapes, sliced_rows)
        if implied != shape:
            theirs = ", ".join(f"{p.key} {shapes[p.key]}" for p in dict.fromkeys(pieces))
            where = implied if len(pieces) == 1 and pieces[0].start is None else theirs
            mismatched.append(f"{name}: source {where}, model {shape}")
            continue
        found[name] = pieces
    for key, shape in (extras or {}).items():
        if key in shapes:
            used.add(key)
            if shapes[key] != shape:
                mismatched.append(f"{key}: source {shapes[key]}, model implies {shape}")
    unexpected = sorted(k for k in model_keys if k not in used)
    return WeightSource(spec=spec, path=path, kind=kind, reader=reader, key_map=found,
                        shapes=dict(expected), missing=missing, unexpected=unexpected,
                        mismatched=mismatched, ignored=len(shapes) - len(model_keys))


def _implied_shape(pieces: tuple[Piece, ...], shapes, sliced_rows: dict[str, int]
                   ) -> tuple[int, ...] | None:
    """The shape the pieces concatenate to, or None when they do not fit their tensors."""
    if len(pieces) == 1 and pieces[0].start is None:
        return shapes[pieces[0].key]
    rows, tail = 0, None
    for p in pieces:
        shape = shapes[p.key]
        if not shape or shape[0] != sliced_rows[p.key] or (tail is not None and tail != shape[1:]):
            return None
        rows, tail = rows + p.stop - p.start, shape[1:]
    return (rows, *tail)
