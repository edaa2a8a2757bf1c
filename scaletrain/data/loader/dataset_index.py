"""What the loader knows about a latent-shard directory before reading any sample.

Reads ``index.json`` (and, where the index leaves something out, the per-shard manifests) of
the layout in :mod:`scaletrain.data.shard_format`. The loader needs, per shard, its tar path and
its sample count (so samples per epoch are known in advance and progress can be recorded as
positions inside each shard), and the VAE's latent scaling and shift.

Shards are identified by their position in the list sorted by file name ("shard id"); a digest
of (name, count) pairs is stored in the loader's state so that a resume against a different
dataset fails loudly instead of silently breaking the exactly-once guarantee.

Accepted ``index.json`` shapes (the preprocessing writes the first; the others are tolerated):

* ``{"shards": [{"name": "000000.tar", "num_samples": 950, "buckets": {...}}, ...], ...}``
* ``{"shards": {"000000.tar": 950, ...}}`` or ``{"shards": ["000000.tar", ...]}`` (counts then
  come from ``000000.manifest.json``).

The latent ``scaling_factor`` (and optional ``shift_factor``, null meaning 0) are looked up
in the index, then in the first shard's manifest, at any nesting depth (``latent``, ``vae`` or
``image_encoder`` sections all work); two different values for one name are an error.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaletrain.data.shard_format import MANIFEST_SUFFIX, read_index, read_json

logger = logging.getLogger(__name__)

_NAME_KEYS = ("name", "shard", "tar", "path", "file", "url")
_COUNT_KEYS = ("num_samples", "samples", "count", "n_samples", "num_ok", "ok")
_BUCKET_KEYS = ("buckets", "bucket_counts")


@dataclass(frozen=True)
class ShardEntry:
    """One complete shard of the dataset."""

    shard_id: int
    name: str
    path: Path
    num_samples: int
    bucket_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetIndex:
    """The shards (sorted by name), their counts and the latent normalisation."""

    root: Path
    shards: tuple[ShardEntry, ...]
    scaling_factor: float
    shift_factor: float
    raw: dict[str, Any]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(s.num_samples for s in self.shards)

    @property
    def bucket_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for shard in self.shards:
            for name, count in shard.bucket_counts.items():
                total[name] = total.get(name, 0) + count
        return dict(sorted(total.items()))

    @property
    def digest(self) -> str:
        """Identity of the shard list: any change in names or counts changes it."""
        text = "\n".join(f"{s.name}:{s.num_samples}" for s in self.shards)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _first(entry: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in entry:
            return entry[key]
    return None


def _tar_name(name: str) -> str:
    name = Path(str(name)).name
    return name if name.endswith(".tar") else name + ".tar"


def _manifest_path(root: Path, tar_name: str) -> Path:
    return root / (tar_name[: -len(".tar")] + MANIFEST_SUFFIX)


def _find_values(node: Any, key: str, found: list[Any]) -> None:
    """Collect every value stored under ``key`` at any depth of a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            else:
                _find_values(v, key, found)
    elif isinstance(node, list):
        for v in node:
            _find_values(v, key, found)


def _lookup_factor(sources: list[tuple[Path, dict[str, Any]]], key: str) -> float | None:
    """The single value of ``key`` in the first source that has it (None: absent everywhere)."""
    for path, data in sources:
        # The index lists shards whose entries may repeat the factor: that is fine as long as
        # they all agree.
        found: list[Any] = []
        _find_values(data, key, found)
        values = {None if v is None else float(v) for v in found}
        if not found:
            continue
        if len(values) > 1:
            raise ValueError(f"{path}: conflicting values for {key!r}: {sorted(map(str, values))}")
        (value,) = values
        return value
    return None


def _parse_entry(root: Path, raw: Any, where: str) -> tuple[str, int | None, dict[str, int]]:
    if isinstance(raw, str):
        return _tar_name(raw), None, {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a shard entry must be a mapping or a name, got {raw!r}")
    name = _first(raw, _NAME_KEYS)
    if not isinstance(name, str):
        raise ValueError(f"{where}: shard entry has no name (one of {', '.join(_NAME_KEYS)})")
    count = _first(raw, _COUNT_KEYS)
    buckets = _first(raw, _BUCKET_KEYS) or {}
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
        raise ValueError(f"{where}: sample count of {name!r} must be an integer, got {count!r}")
    return _tar_name(name), count, dict(buckets) if isinstance(buckets, dict) else {}


def load_dataset_index(directory: str | Path) -> DatasetIndex:
    """Read and check the index of a latent-shard directory (clear errors for bad input)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data.path is not a directory of latent shards")
    index = read_index(root)
    index_path = root / "index.json"
    raw_shards = index.get("shards")
    if isinstance(raw_shards, dict):
        items = [
            ({"name": k, **v} if isinstance(v, dict) else {"name": k, "num_samples": v})
            for k, v in raw_shards.items()
        ]
    elif isinstance(raw_shards, list):
        items = raw_shards
    else:
        raise ValueError(f"{index_path}: 'shards' must list the dataset's shards")
    if not items:
        raise ValueError(f"{index_path}: lists no shards; nothing to train on")

    parsed: dict[str, tuple[int, dict[str, int]]] = {}
    first_manifest: tuple[Path, dict[str, Any]] | None = None
    for i, raw in enumerate(items):
        name, count, buckets = _parse_entry(root, raw, f"{index_path}: shards[{i}]")
        if name in parsed:
            raise ValueError(f"{index_path}: shard {name!r} is listed twice")
        if count is None or not buckets:
            manifest_path = _manifest_path(root, name)
            if not manifest_path.is_file():
                if count is None:
                    raise ValueError(
                        f"{index_path}: no sample count for {name!r} and no {manifest_path.name}"
                    )
            else:
                manifest = read_json(manifest_path)
                first_manifest = first_manifest or (manifest_path, manifest)
                count = count if count is not None else _first(manifest, _COUNT_KEYS)
                if not isinstance(count, int):
                    raise ValueError(f"{manifest_path}: no integer sample count")
                buckets = buckets or dict(_first(manifest, _BUCKET_KEYS) or {})
        if count < 0:
            raise ValueError(f"{index_path}: negative sample count for {name!r}")
        parsed[name] = (count, buckets)

    # A shard with no samples has no work in it (and could never be "done"): leave it out.
    names = [name for name in sorted(parsed) if parsed[name][0] > 0]
    shards = [
        ShardEntry(shard_id, name, root / name, *parsed[name])
        for shard_id, name in enumerate(names)
    ]
    if not shards:
        raise ValueError(f"{index_path}: the dataset holds no samples")

    sources: list[tuple[Path, dict[str, Any]]] = [(index_path, index)]
    if first_manifest is None:
        manifest_path = _manifest_path(root, shards[0].name)
        if manifest_path.is_file():
            first_manifest = (manifest_path, read_json(manifest_path))
    if first_manifest is not None:
        sources.append(first_manifest)
    scaling = _lookup_factor(sources, "scaling_factor")
    if scaling is None:
        where = " or ".join(str(p) for p, _ in sources)
        raise ValueError(
            f"{where}: no latent 'scaling_factor'; the loader needs the VAE's scaling to "
            "normalise latents ((z - shift) * scale)"
        )
    shift = _lookup_factor(sources, "shift_factor") or 0.0
    return DatasetIndex(root, tuple(shards), scaling, shift, index)
