"""What the loader knows about a latent-shard directory (local, or a URL prefix such as
``s3://bucket/latents``) before reading any sample.

Reads ``index.json`` (and, where the index leaves something out, the per-shard manifests) of
the layout in :mod:`scaletrain.data.shard_format`. The loader needs, per shard, its tar path and
its sample count (so samples per epoch are known in advance and progress can be recorded as
positions inside each shard), and the VAE's latent scaling and shift.

Shards are identified by their position in the list sorted by file name ("shard id"); the
loader's state stores the (name, count) list it read, so that a resume can tell which shards
were added, removed or rewritten since (:func:`~scaletrain.data.loader.progress.reconcile_source`).

Accepted ``index.json`` shapes (the preprocessing writes the first; the others are tolerated):

* ``{"shards": [{"name": "000000.tar", "num_samples": 950, "buckets": {...}}, ...], ...}``
* ``{"shards": {"000000.tar": 950, ...}}`` or ``{"shards": ["000000.tar", ...]}`` (counts then
  come from ``000000.manifest.json``).

The latent ``scaling_factor`` (and optional ``shift_factor``, null meaning 0) are looked up
in the index, then in the first shard's manifest, at any nesting depth (``latent``, ``vae`` or
``image_encoder`` sections all work); two different values for one name are an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaletrain.data import storage
from scaletrain.data.shard_format import INDEX_NAME, MANIFEST_SUFFIX
from scaletrain.data.storage import StorageConfig

logger = logging.getLogger(__name__)

_NAME_KEYS = ("name", "shard", "tar", "path", "file", "url")
_COUNT_KEYS = ("num_samples", "samples", "count", "n_samples", "num_ok", "ok")
_BUCKET_KEYS = ("buckets", "bucket_counts")


@dataclass(frozen=True)
class ShardEntry:
    """One complete shard of the dataset."""

    shard_id: int
    name: str
    path: str  # a local path or a URL
    num_samples: int
    bucket_counts: dict[str, int] = field(default_factory=dict)
    size_bytes: int | None = None  # from the index when it records it (saves a request)


@dataclass(frozen=True)
class DatasetIndex:
    """The shards (sorted by name), their counts and the latent normalisation."""

    root: str  # a local directory or a URL prefix
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
    def shard_bytes(self) -> dict[str, int]:
        """Bytes of each shard the index records (preprocess writes them)."""
        return {s.name: s.size_bytes for s in self.shards if s.size_bytes is not None}

    @property
    def shard_list(self) -> tuple[tuple[str, int], ...]:
        """(name, count) of every shard, sorted by name: what the loader's progress keys on."""
        return tuple((s.name, s.num_samples) for s in self.shards)


def _first(entry: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in entry:
            return entry[key]
    return None


def _tar_name(name: str) -> str:
    name = Path(str(name)).name
    return name if name.endswith(".tar") else name + ".tar"


def _manifest_path(root: str, tar_name: str) -> str:
    return storage.join(root, tar_name[: -len(".tar")] + MANIFEST_SUFFIX)


def _read_json_or_none(url: str, cfg: StorageConfig | None) -> dict[str, Any] | None:
    try:
        data = storage.read_json(url, cfg)
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        # One line naming the file: a truncated index/manifest (a copy cut short, a full disk).
        raise ValueError(f"{url}: not valid JSON ({exc}); truncated or damaged? rebuild it "
                         "with `scaletrain preprocess` on the same input and output") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{url}: not a JSON object (got {type(data).__name__})")
    return data


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


def _lookup_factor(sources: list[tuple[str, dict[str, Any]]], key: str) -> float | None:
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


def _parse_entry(raw: Any, where: str) -> tuple[str, int | None, dict[str, int]]:
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


def load_dataset_index(directory: str | Path, cfg: StorageConfig | None = None,
                       key: str = "data.path") -> DatasetIndex:
    """Read and check the index of a latent-shard directory or URL prefix (clear errors for
    bad input, naming ``key``)."""
    root = str(directory)
    storage.check_url(root, key)
    if storage.is_local(root):
        root = str(storage.local_path(root))
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{root}: {key} is not a directory of latent shards")
    index_path = storage.join(root, INDEX_NAME)
    index = _read_json_or_none(index_path, cfg)
    if index is None:
        raise FileNotFoundError(
            f"{index_path}: no dataset index; run `scaletrain preprocess` on this directory first"
        )
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
    sizes = {_tar_name(_first(raw, _NAME_KEYS)): raw["size_bytes"] for raw in items
             if isinstance(raw, dict) and isinstance(raw.get("size_bytes"), int)
             and isinstance(_first(raw, _NAME_KEYS), str)}
    first_manifest: tuple[str, dict[str, Any]] | None = None
    for i, raw in enumerate(items):
        name, count, buckets = _parse_entry(raw, f"{index_path}: shards[{i}]")
        if name in parsed:
            raise ValueError(f"{index_path}: shard {name!r} is listed twice")
        if count is None or not buckets:
            manifest_path = _manifest_path(root, name)
            manifest = _read_json_or_none(manifest_path, cfg)
            if manifest is None:
                if count is None:
                    raise ValueError(
                        f"{index_path}: no sample count for {name!r} and no "
                        f"{manifest_path.rsplit('/', 1)[-1]}"
                    )
            else:
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
        ShardEntry(shard_id, name, storage.join(root, name), *parsed[name], sizes.get(name))
        for shard_id, name in enumerate(names)
    ]
    if not shards:
        raise ValueError(f"{index_path}: the dataset holds no samples")

    sources: list[tuple[str, dict[str, Any]]] = [(index_path, index)]
    if first_manifest is None:
        manifest_path = _manifest_path(root, shards[0].name)
        manifest = _read_json_or_none(manifest_path, cfg)
        if manifest is not None:
            first_manifest = (manifest_path, manifest)
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
