"""Which shards exist, what each is called in the output, and which of them are ours.

Work is split by whole shards: shard i (in the sorted, expanded input list) belongs to rank
i mod world. Every rank computes the same list, so no coordination is needed, and a rerun
with another world size still covers every shard exactly once (complete ones are skipped).

Rank and world come from, in order of precedence:

1. a SLURM job array: ``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN`` (divided by
   ``SLURM_ARRAY_TASK_STEP``) of ``SLURM_ARRAY_TASK_COUNT`` tasks;
2. torchrun / srun inside one job (``RANK``/``WORLD_SIZE`` or ``SLURM_PROCID``/
   ``SLURM_NTASKS``, read by :mod:`scaletrain.core.dist_env`);
3. neither: rank 0 of 1.

An array task that itself runs several processes (srun, or ``--workers``) nests them:
global rank = array_rank * inner_world + inner_rank.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from pathlib import PurePosixPath

import webdataset as wds

from scaletrain.core.config_base import ConfigError
from scaletrain.core.dist_env import dist_env_from_environ
from scaletrain.data import storage
from scaletrain.data.storage import StorageConfig


def expand_inputs(patterns: str | list[str], cfg: StorageConfig | None = None) -> list[str]:
    """Brace patterns (``data/{00000..00099}.tar``), ``::``-joined lists, globs (local or
    ``s3://bucket/raw/*.tar``) and ``pipe:`` URLs -> a sorted list of distinct shard URLs."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(pattern):
            if storage.scheme(url) is not None and not url.startswith("pipe:"):
                storage.check_url(url, "--input")
            globbing = any(c in url for c in "*?[")
            if globbing and storage.scheme(url) is not None and url.split(":", 1)[0] not in (
                    "pipe", "http", "https"):
                matches = storage.glob_urls(url, cfg)
                if not matches:
                    raise FileNotFoundError(f"input pattern {url!r} matches no object")
                urls.extend(matches)
            elif not _is_url(url) and globbing:
                matches = sorted(glob.glob(url))
                if not matches:
                    raise FileNotFoundError(f"input pattern {url!r} matches no file")
                urls.extend(matches)
            else:
                urls.append(url)
    if not urls:
        raise ValueError(f"input {patterns!r} names no shard")
    return sorted(dict.fromkeys(urls))


def _location(url: str) -> tuple[str, tuple[str, ...]]:
    """(where, path parts) of a local path (resolved) or a URL prefix, for comparing folders."""
    if storage.is_local(url):
        return "", tuple(storage.local_path(url).expanduser().resolve().parts)
    name = storage.scheme(url) or ""
    rest = url.split("://", 1)[-1] if "://" in url else url.split(":", 1)[-1]
    return name, tuple(part for part in rest.split("/") if part)


def check_output_apart(output: str, inputs: list[str]) -> None:
    """Refuse an output folder equal to, inside or containing the folder of an input shard.

    Outputs are named after their inputs (``00000.tar``), so such an output would overwrite
    the raw shards or mix latents with them; checked before anything is read or written.
    ``pipe:`` inputs name no folder and are not checked."""
    out_where, out_parts = _location(str(output))
    for url in inputs:
        if url.startswith("pipe:"):
            continue
        where, parts = _location(url)
        folder = parts[:-1]
        if where != out_where:
            continue
        shorter = min(len(folder), len(out_parts))
        if folder[:shorter] == out_parts[:shorter]:
            relation = ("is the folder of" if folder == out_parts else
                        "is inside the folder of" if len(out_parts) > len(folder) else
                        "contains the folder of")
            raise ConfigError(
                f"--output {output!r} {relation} input {url!r}; it could overwrite or mix "
                f"with the raw shards: give an output folder apart from the inputs"
            )


def _is_url(url: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url)) and not re.match(
        r"^[A-Za-z]:[\\/]", url
    )


def output_stem(url: str) -> str:
    """The output name of a shard: its file name without ``.tar`` (``pipe:`` URLs: the last
    word that names a .tar, e.g. ``pipe:aws s3 cp s3://b/00042.tar -`` -> ``00042``)."""
    candidates = url.split() if url.startswith("pipe:") else [url]
    for word in reversed(candidates):
        name = PurePosixPath(word.split("?", 1)[0]).name
        for suffix in (".tar.gz", ".tgz", ".tar"):
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
    raise ValueError(
        f"cannot name the output of {url!r}: no word of it ends in .tar "
        f"(outputs are named after their input shard)"
    )


def shard_table(urls: list[str]) -> list[tuple[str, str]]:
    """(stem, url) for every input, refusing two inputs that would share an output."""
    seen: dict[str, str] = {}
    table = []
    for url in urls:
        stem = output_stem(url)
        if stem in seen:
            raise ValueError(
                f"inputs {seen[stem]!r} and {url!r} would both write {stem}.tar; "
                f"give shards distinct file names or preprocess them into separate outputs"
            )
        seen[stem] = url
        table.append((stem, url))
    return table


def resolve_rank_world(env: Mapping[str, str] | None = None) -> tuple[int, int, str]:
    """(rank, world, source) of this process for splitting shards (see module docstring)."""
    env = os.environ if env is None else env
    inner = dist_env_from_environ(env)
    if "SLURM_ARRAY_TASK_ID" in env:
        task = _int(env, "SLURM_ARRAY_TASK_ID")
        low = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        if "SLURM_ARRAY_TASK_COUNT" in env:
            count = _int(env, "SLURM_ARRAY_TASK_COUNT")
        elif "SLURM_ARRAY_TASK_MAX" in env:
            count = (_int(env, "SLURM_ARRAY_TASK_MAX") - low) // max(step, 1) + 1
        else:
            raise ValueError(
                "SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor "
                "SLURM_ARRAY_TASK_MAX: cannot tell how many array tasks share the shards"
            )
        array_rank = (task - low) // max(step, 1)
        if not 0 <= array_rank < count:
            raise ValueError(
                f"SLURM array task {task} (min {low}, step {step}) is outside {count} tasks"
            )
        source = "slurm-array" + (f"+{inner.source}" if inner.world_size > 1 else "")
        return array_rank * inner.world_size + inner.rank, count * inner.world_size, source
    return inner.rank, inner.world_size, inner.source


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name].strip()
    if not value.lstrip("-").isdigit():
        raise ValueError(f"environment variable {name}={value!r} is not an integer")
    return int(value)


def assign(items: list, rank: int, world: int) -> list:
    """This rank's share: items rank, rank + world, rank + 2*world, ..."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    return items[rank::world]
