"""Writing latent shards so that a crash never leaves a half shard that looks complete.

For each shard, in this order:

1. samples go into ``{stem}.tar.tmp-<host>-<pid>`` (private to this process);
2. the finished tar is renamed to ``{stem}.tar``;
3. its ledger ``{stem}.errors.jsonl`` is written (temporary name, then rename);
4. its manifest ``{stem}.manifest.json`` is written last, the same way.

A shard is complete when its manifest exists and its tar has the size the manifest records
(:func:`shard_is_complete`); anything else is redone by a rerun.

The output may be a URL prefix (``s3://bucket/latents``, :mod:`scaletrain.data.storage`): the
tar is then written to a local temporary file and uploaded as one object (an object store
publishes it only when the upload completes), then the ledger and the manifest, each one
object; ``index.json`` is written last by :func:`finalize_index`. A reader therefore never
sees a half-written shard or an index naming a shard that is not there yet. The dataset-level files
(``index.json``, ``errors.jsonl``) are rebuilt from the manifests and ledgers by
:func:`finalize_index`: cheap (no tar is opened) and idempotent, so whoever finishes last,
or a separate step after a SLURM array (see docs in ``scaletrain/data/preprocess/__init__``),
can run it any number of times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import webdataset as wds

from scaletrain.core.config_base import ConfigError
from scaletrain.data import shard_format as sf
from scaletrain.data import storage
from scaletrain.data.preprocess.config import (
    PreprocessConfig,
    config_differences,
    fingerprinted_config,
    output_fingerprint,
)
from scaletrain.data.preprocess.samples import ShardEnd
from scaletrain.data.storage import StorageConfig

log = logging.getLogger(__name__)


TAR_OVERHEAD = "tar headers+padding"


class FingerprintMismatch(ConfigError):
    """The output directory holds shards made with another config."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(out_dir: str, stem: str) -> str:
    return storage.join(out_dir, f"{stem}{sf.MANIFEST_SUFFIX}")


def _read_json(url: str, cfg: StorageConfig | None) -> Any | None:
    """A JSON file or object, None when absent or unreadable (a rerun redoes its shard)."""
    try:
        return storage.read_json(url, cfg)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    except OSError as exc:
        log.warning("%s: unreadable: %s", url, exc)
        return None


def input_size(url: str, cfg: StorageConfig | None = None) -> int | None:
    """Bytes of an input shard now, or None where that cannot be asked cheaply (pipe:,
    http) or the input is gone."""
    if not (storage.is_local(url) or storage.scheme(url) == "s3"):
        return None
    try:
        return storage.size(url, cfg)
    except (OSError, ValueError):
        return None


def shard_is_complete(out_dir: str | Path, stem: str, fingerprint: str, verify: bool = False,
                      cfg: StorageConfig | None = None, input_url: str | None = None) -> bool:
    """True when ``stem`` was finished by a run with this config from the input as it is
    now (same size as the manifest records; ``verify`` also compares the input's sha256);
    raises FingerprintMismatch when it was finished by a run with another one."""
    out_dir = str(out_dir)
    mpath = manifest_path(out_dir, stem)
    manifest = _read_json(mpath, cfg)
    if manifest is None:
        return False
    tar = storage.join(out_dir, f"{stem}.tar")
    if manifest.get("config_fingerprint") != fingerprint:
        raise FingerprintMismatch(
            f"{mpath}: made with a different preprocess config (fingerprint "
            f"{manifest.get('config_fingerprint')} != {fingerprint}); write to a fresh output "
            f"directory, or delete the old shards to redo them"
        )
    if storage.size(tar, cfg) != manifest.get("size_bytes"):
        return False
    recorded = manifest.get("input") or {}
    if input_url is not None and recorded.get("size_bytes") is not None:
        now = input_size(input_url, cfg)
        if now is not None and now != recorded["size_bytes"]:
            log.info("%s: its input %s changed (%d -> %d bytes); redoing the shard", stem,
                     input_url, recorded["size_bytes"], now)
            return False
    if verify and input_url is not None and recorded.get("sha256"):
        if storage.is_local(input_url) and storage.local_path(input_url).is_file() and \
                file_sha256(storage.local_path(input_url)) != recorded["sha256"]:
            return False
    if not verify:
        return True
    digest = hashlib.sha256()
    if storage.is_local(tar):
        return file_sha256(storage.local_path(tar)) == manifest.get("sha256")
    for block in storage.iter_blocks(tar, cfg or StorageConfig()):
        digest.update(block)
    return digest.hexdigest() == manifest.get("sha256")


class ShardOutput:
    """One output shard being written (see the module docstring for the commit order)."""

    def __init__(self, out_dir: str | Path, stem: str, url: str,
                 cfg: StorageConfig | None = None) -> None:
        self.out_dir = str(out_dir)
        self.cfg = cfg
        self.stem = stem
        self.url = url
        self.final = storage.join(self.out_dir, f"{stem}.tar")
        # Local output: a temporary beside the final name (renamed into place). Remote: a
        # local temporary file, uploaded whole.
        staging = (storage.local_path(self.out_dir) if storage.is_local(self.out_dir)
                   else Path(tempfile.gettempdir()))
        self.tmp = staging / f"{stem}.tar.tmp-{socket.gethostname()}-{os.getpid()}"
        # Fixed integer mtime: the same input and config give byte-identical shards (a float
        # would add a pax header block to every file).
        self.writer = wds.TarWriter(str(self.tmp), encoder=False, mtime=0)
        self.ledger: list[dict[str, Any]] = []
        self.bucket_counts: Counter[str] = Counter()
        self.skip_counts: Counter[str] = Counter()
        # Bytes of each member kind over the shard, and of the tar's headers and padding:
        # what sizes a dataset (printed per sample by `scaletrain preprocess`).
        self.member_bytes: Counter[str] = Counter()
        self.num_samples = 0
        # "{key}.{ext}" -> checksum (XXH3-64) of the member's bytes (the loader verifies each on read).
        self.member_checksums: dict[str, int] = {}

    def write(self, sample: dict[str, Any], bucket: tuple[int, int]) -> None:
        for ext, data in sample.items():
            if not ext.startswith("__"):
                self.member_bytes[ext] += len(data)
                self.member_bytes[TAR_OVERHEAD] += 512 + (-len(data)) % 512
                self.member_checksums[f"{sample['__key__']}.{ext}"] = sf.member_checksum(data)
        self.writer.write(sample)
        self.num_samples += 1
        self.bucket_counts[sf.bucket_name(*bucket)] += 1

    def skip(self, key: str | None, code: str, reason: str) -> None:
        self.ledger.append({"shard": self.stem, "key": key, "code": code, "reason": reason})
        if key is not None:
            self.skip_counts[code] += 1

    def commit(self, end: ShardEnd, encoders: dict[str, Any], fingerprint: str) -> dict[str, Any]:
        """Close, rename, write ledger then manifest. Returns the manifest."""
        keyed_skips = sum(self.skip_counts.values())
        if end.num_groups != self.num_samples + keyed_skips:
            self.abort()
            raise RuntimeError(
                f"{self.stem}: {end.num_groups} samples read but {self.num_samples} written "
                f"+ {keyed_skips} skipped: a sample was lost (a bug; the shard is not committed)"
            )
        self.writer.close()
        sha256, size_bytes = file_sha256(self.tmp), self.tmp.stat().st_size
        if storage.is_local(self.final):
            os.replace(self.tmp, storage.local_path(self.final))
        else:
            try:
                storage.upload(self.tmp, self.final, self.cfg)
            finally:
                self.tmp.unlink(missing_ok=True)
        ledger_bytes = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.ledger)
        storage.write_bytes(storage.join(self.out_dir, f"{self.stem}{sf.SHARD_LEDGER_SUFFIX}"),
                            ledger_bytes, self.cfg)
        manifest = {
            "format_version": sf.FORMAT_VERSION,
            "shard": self.stem,
            "name": f"{self.stem}.tar",
            "input": {"url": end.url, "sha256": end.input_sha256, "size_bytes": end.input_bytes},
            "num_input_samples": end.num_groups,
            "num_samples": self.num_samples,
            "num_skipped": keyed_skips,
            "skipped_by_reason": dict(sorted(self.skip_counts.items())),
            "tar_problem": end.tar_problem,
            "bucket_counts": dict(sorted(self.bucket_counts.items())),
            "member_bytes": dict(sorted(self.member_bytes.items())),
            "sha256": sha256,
            "size_bytes": size_bytes,
            "config_fingerprint": fingerprint,
            sf.MEMBER_CHECKSUMS: self.member_checksums,
            **encoders,
        }
        storage.write_json(manifest_path(self.out_dir, self.stem), manifest, self.cfg)
        storage.remove(storage.join(self.out_dir, f"{self.stem}{sf.FAILED_SUFFIX}"), self.cfg)
        return manifest

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - already failing; the temp file goes anyway
            pass
        self.tmp.unlink(missing_ok=True)


def record_failure(out_dir: str | Path, stem: str, url: str, reason: str,
                   cfg: StorageConfig | None = None) -> None:
    """Mark a shard that could not be read; finalize_index puts it in the ledger."""
    storage.write_json(storage.join(str(out_dir), f"{stem}{sf.FAILED_SUFFIX}"),
                       {"shard": stem, "url": url, "reason": reason}, cfg)


LOCK_DIR = ".locks"


class ShardLocks:
    """Per-shard locks on a local output (``OUT/.locks/{stem}.lock``, flock): two preprocess
    runs on one output cooperate: each writes only the shards it could lock, and never
    touches (or deletes the temporaries of) a shard another live run is writing. A lock dies
    with its process, so a crashed run leaves nothing held. Object-store outputs stage their
    temporaries in per-process local files and need none."""

    def __init__(self, out_dir: str) -> None:
        self.dir = storage.local_path(out_dir) / LOCK_DIR if storage.is_local(out_dir) else None
        self.fds: list[int] = []

    def claim(self, stems: list[str]) -> tuple[list[str], list[str]]:
        """(stems locked by this run, stems another run holds)."""
        if self.dir is None:
            return list(stems), []
        import fcntl

        self.dir.mkdir(exist_ok=True)
        mine, theirs = [], []
        for stem in stems:
            fd = os.open(self.dir / f"{stem}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                theirs.append(stem)
                continue
            self.fds.append(fd)
            mine.append(stem)
        return mine, theirs

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)  # closing the descriptor releases its flock
        self.fds = []


def remove_stale_temporaries(out_dir: str | Path, stems: list[str]) -> None:
    """Delete temporary tars of ``stems`` left by a crashed or preempted run. Only for the
    shards this run holds the locks of (:class:`ShardLocks`): no live process writes them. (Remote output stages its temporaries
    locally, so nothing is left in the bucket.)"""
    if not storage.is_local(out_dir):
        return
    for stem in stems:
        for tmp in storage.local_path(out_dir).glob(f"{stem}.tar.tmp-*"):
            log.info("removing %s, left by an interrupted run", tmp)
            tmp.unlink(missing_ok=True)


def check_same_config(out_dir: str | Path, preprocess: PreprocessConfig,
                      cfg: StorageConfig | None = None) -> None:
    """Refuse to add shards made with another config to a directory that has some already
    (one read of plan.json, not one per manifest: cheap for thousands of ranks), naming the
    keys that differ. A rerun with the same config (a killed run resumed) passes, and so
    does any config where no shard was finished yet."""
    plan = _read_json(storage.join(str(out_dir), sf.PLAN_NAME), cfg)
    if plan is None:
        return
    previous = plan.get("config_fingerprint")
    fingerprint = output_fingerprint(preprocess)
    if previous == fingerprint or not storage.listing(out_dir, sf.MANIFEST_SUFFIX, cfg):
        return
    recorded = plan.get("config")
    differing = (config_differences(recorded, fingerprinted_config(preprocess))
                 if isinstance(recorded, dict) else [])
    # Written before plan.json recorded the config: only the fingerprints can be compared.
    what = ", ".join(f"preprocess.{d}" for d in differing) or (
        f"fingerprint {previous} != {fingerprint}")
    raise FingerprintMismatch(
        f"{out_dir} holds shards made with a different preprocess config ({what}); write to "
        f"a fresh --output, rerun with the config it was made with, or delete the old shards "
        f"to redo them"
    )


def write_plan(out_dir: str | Path, table: list[tuple[str, str]], preprocess: PreprocessConfig,
               cfg: StorageConfig | None = None) -> None:
    storage.write_json(
        storage.join(str(out_dir), sf.PLAN_NAME),
        {
            "shards": [{"shard": stem, "url": url} for stem, url in table],
            "config_fingerprint": output_fingerprint(preprocess),
            # What check_same_config compares a rerun with, key by key.
            "config": fingerprinted_config(preprocess),
        },
        cfg,
    )


def _manifest_state(out_dir: str, cfg: StorageConfig | None) -> list[tuple[str, str]]:
    """Names and version tags of the files the index is built from (a cheap change
    detector)."""
    state = []
    for suffix in (sf.MANIFEST_SUFFIX, sf.FAILED_SUFFIX):
        state += [(name, tag) for name, (tag, _) in storage.listing(out_dir, suffix, cfg).items()]
    return sorted(state)


def finalize_index(output_dir: str | Path, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """(Re)build ``index.json`` and ``errors.jsonl`` from the manifests and ledgers.

    Lists every complete shard (manifest present, tar of the recorded size), and says which
    planned shards are missing and which failed. Safe to run at any time, by any number of
    processes: it only reads manifests and replaces two files atomically. Two ranks that
    finish together cannot leave a stale index: each rescans after writing and rebuilds if a
    manifest appeared meanwhile, so the last write always saw every earlier manifest.
    """
    out_dir = str(output_dir)
    for _ in range(10):
        before = _manifest_state(out_dir, cfg)
        index = _build_index(out_dir, cfg)
        if _manifest_state(out_dir, cfg) == before:
            break
    return index


def _build_index(out_dir: str, cfg: StorageConfig | None) -> dict[str, Any]:
    plan = _read_json(storage.join(out_dir, sf.PLAN_NAME), cfg)
    planned = [s["shard"] for s in plan["shards"]] if plan else []
    shards, ledger_lines, failed = [], [], []
    totals: Counter[str] = Counter()
    member_bytes: Counter[str] = Counter()
    fingerprints, encoders = set(), {}
    done = set()
    checksummed = True  # every listed shard's manifest records its members' checksums
    tars = {name: size for name, (_, size) in storage.listing(out_dir, ".tar", cfg).items()}
    for name in sorted(storage.listing(out_dir, sf.MANIFEST_SUFFIX, cfg)):
        stem = name[: -len(sf.MANIFEST_SUFFIX)]
        mpath = storage.join(out_dir, name)
        manifest = _read_json(mpath, cfg)
        if manifest is None:
            log.warning("%s: unreadable manifest, shard left out of the index", mpath)
            continue
        if tars.get(manifest["name"]) != manifest["size_bytes"]:
            log.warning("%s: tar missing or of the wrong size, left out of the index",
                        storage.join(out_dir, manifest["name"]))
            continue
        done.add(stem)
        checksummed = checksummed and sf.MEMBER_CHECKSUMS in manifest
        fingerprints.add(manifest["config_fingerprint"])
        encoders = {k: manifest[k] for k in ("image_encoder", "text_encoder") if k in manifest}
        shards.append(
            {
                "name": manifest["name"],
                "num_samples": manifest["num_samples"],
                "num_skipped": manifest["num_skipped"],
                "bucket_counts": manifest["bucket_counts"],
                "sha256": manifest["sha256"],
                "size_bytes": manifest["size_bytes"],
            }
        )
        totals.update(manifest["bucket_counts"])
        member_bytes.update(manifest.get("member_bytes", {}))
        try:
            ledger = storage.read_bytes(storage.join(out_dir, f"{stem}{sf.SHARD_LEDGER_SUFFIX}"),
                                        cfg).decode("utf-8")
        except FileNotFoundError:
            ledger = ""
        ledger_lines.extend(line for line in ledger.splitlines() if line)
    for name in sorted(storage.listing(out_dir, sf.FAILED_SUFFIX, cfg)):
        info = _read_json(storage.join(out_dir, name), cfg)
        if info is None or info["shard"] in done or (planned and info["shard"] not in planned):
            continue  # since completed, or no longer an input of this output
        failed.append({"shard": info["shard"], "reason": info["reason"]})
        ledger_lines.append(
            json.dumps(
                {
                    "shard": info["shard"],
                    "key": None,
                    "code": "shard_failed",
                    "reason": info["reason"],
                },
                sort_keys=True,
            )
        )
    if len(fingerprints) > 1:
        raise FingerprintMismatch(
            f"{out_dir}: shards made with different configs ({sorted(fingerprints)}); "
            f"an index over them would mix two datasets"
        )
    missing = [stem for stem in planned if stem not in done]
    index = {
        "format_version": sf.FORMAT_VERSION,
        "shards": shards,
        "num_shards": len(shards),
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_skipped": sum(s["num_skipped"] for s in shards),
        "bucket_counts": dict(sorted(totals.items())),
        "member_bytes": dict(sorted(member_bytes.items())),
        "config_fingerprint": next(iter(fingerprints), None),
        "complete": not missing,
        "missing": missing,
        "failed": failed,
        **encoders,
    }
    if shards and checksummed:
        index[sf.MEMBER_CHECKSUMS] = True  # the loader reads them from each shard's manifest
    storage.write_bytes(storage.join(out_dir, sf.LEDGER_NAME),
                        "".join(line + "\n" for line in ledger_lines), cfg)
    storage.write_json(storage.join(out_dir, sf.INDEX_NAME), index, cfg)  # last
    return index


def describe_sizes(index: dict[str, Any]) -> list[str]:
    """Bytes per sample of each member kind, and what 100M samples would take (for sizing a
    run's storage), from an index's ``member_bytes``."""
    samples, sizes = index.get("num_samples", 0), index.get("member_bytes") or {}
    if not samples or not sizes:
        return []
    total = sum(sizes.values())
    parts = ", ".join(f"{name} {_human(b / samples)}" for name, b in sorted(sizes.items()))
    return [f"bytes per sample: {parts}; total {_human(total / samples)} "
            f"(100M samples: {_human(total / samples * 1e8)})"]


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    raise AssertionError("unreachable")
