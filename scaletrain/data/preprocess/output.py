"""Writing latent shards so that a crash never leaves a half shard that looks complete.

For each shard, in this order:

1. samples go into ``{stem}.tar.tmp-<host>-<pid>`` (private to this process);
2. the finished tar is renamed to ``{stem}.tar``;
3. its ledger ``{stem}.errors.jsonl`` is written (temporary name, then rename);
4. its manifest ``{stem}.manifest.json`` is written last, the same way.

A shard is complete when its manifest exists and its tar has the size the manifest records
(:func:`shard_is_complete`); anything else is redone by a rerun. The dataset-level files
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
from collections import Counter
from pathlib import Path
from typing import Any

import webdataset as wds

from scaletrain.core.files import atomic_write, atomic_write_json
from scaletrain.data import shard_format as sf
from scaletrain.data.preprocess.samples import ShardEnd

log = logging.getLogger(__name__)


class FingerprintMismatch(RuntimeError):
    """The output directory holds shards made with another config."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f"{stem}{sf.MANIFEST_SUFFIX}"


def shard_is_complete(out_dir: Path, stem: str, fingerprint: str, verify: bool = False) -> bool:
    """True when ``stem`` was finished by a run with this config; raises
    FingerprintMismatch when it was finished by a run with another one."""
    mpath = manifest_path(out_dir, stem)
    tar = out_dir / f"{stem}.tar"
    if not mpath.is_file() or not tar.is_file():
        return False
    try:
        manifest = sf.read_json(mpath)
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("config_fingerprint") != fingerprint:
        raise FingerprintMismatch(
            f"{mpath}: made with a different preprocess config (fingerprint "
            f"{manifest.get('config_fingerprint')} != {fingerprint}); write to a fresh output "
            f"directory, or delete the old shards to redo them"
        )
    if tar.stat().st_size != manifest.get("size_bytes"):
        return False
    return not verify or file_sha256(tar) == manifest.get("sha256")


class ShardOutput:
    """One output shard being written (see the module docstring for the commit order)."""

    def __init__(self, out_dir: Path, stem: str, url: str) -> None:
        self.out_dir = out_dir
        self.stem = stem
        self.url = url
        self.final = out_dir / f"{stem}.tar"
        self.tmp = out_dir / f"{stem}.tar.tmp-{socket.gethostname()}-{os.getpid()}"
        # Fixed integer mtime: the same input and config give byte-identical shards (a float
        # would add a pax header block to every file).
        self.writer = wds.TarWriter(str(self.tmp), encoder=False, mtime=0)
        self.ledger: list[dict[str, Any]] = []
        self.bucket_counts: Counter[str] = Counter()
        self.skip_counts: Counter[str] = Counter()
        self.num_samples = 0

    def write(self, sample: dict[str, Any], bucket: tuple[int, int]) -> None:
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
        os.replace(self.tmp, self.final)
        ledger_bytes = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.ledger)
        atomic_write(self.out_dir / f"{self.stem}{sf.SHARD_LEDGER_SUFFIX}", ledger_bytes, durable=True)
        manifest = {
            "format_version": sf.FORMAT_VERSION,
            "shard": self.stem,
            "name": self.final.name,
            "input": {"url": end.url, "sha256": end.input_sha256, "size_bytes": end.input_bytes},
            "num_input_samples": end.num_groups,
            "num_samples": self.num_samples,
            "num_skipped": keyed_skips,
            "skipped_by_reason": dict(sorted(self.skip_counts.items())),
            "tar_problem": end.tar_problem,
            "bucket_counts": dict(sorted(self.bucket_counts.items())),
            "sha256": file_sha256(self.final),
            "size_bytes": self.final.stat().st_size,
            "config_fingerprint": fingerprint,
            **encoders,
        }
        atomic_write_json(manifest_path(self.out_dir, self.stem), manifest, durable=True)
        (self.out_dir / f"{self.stem}{sf.FAILED_SUFFIX}").unlink(missing_ok=True)
        return manifest

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - already failing; the temp file goes anyway
            pass
        self.tmp.unlink(missing_ok=True)


def record_failure(out_dir: Path, stem: str, url: str, reason: str) -> None:
    """Mark a shard that could not be read; finalize_index puts it in the ledger."""
    atomic_write_json(
        out_dir / f"{stem}{sf.FAILED_SUFFIX}", {"shard": stem, "url": url, "reason": reason},
        durable=True,
    )


def remove_stale_temporaries(out_dir: Path, stems: list[str]) -> None:
    """Delete temporary tars of ``stems`` left by a crashed or preempted run. Only for this
    rank's own shards: no other process writes them."""
    for stem in stems:
        for tmp in out_dir.glob(f"{stem}.tar.tmp-*"):
            log.info("removing %s, left by an interrupted run", tmp)
            tmp.unlink(missing_ok=True)


def check_same_config(out_dir: Path, fingerprint: str) -> None:
    """Refuse to add shards made with another config to a directory that has some already
    (one read of plan.json, not one per manifest: cheap for thousands of ranks)."""
    plan = out_dir / sf.PLAN_NAME
    if not plan.is_file():
        return
    previous = sf.read_json(plan).get("config_fingerprint")
    if previous != fingerprint and next(out_dir.glob(f"*{sf.MANIFEST_SUFFIX}"), None):
        raise FingerprintMismatch(
            f"{out_dir} holds shards made with a different preprocess config (fingerprint "
            f"{previous} != {fingerprint}); write to a fresh output directory, or delete the "
            f"old shards to redo them"
        )


def write_plan(out_dir: Path, table: list[tuple[str, str]], fingerprint: str) -> None:
    atomic_write_json(
        out_dir / sf.PLAN_NAME,
        {
            "shards": [{"shard": stem, "url": url} for stem, url in table],
            "config_fingerprint": fingerprint,
        },
        durable=True,
    )


def _manifest_state(out_dir: Path) -> list[tuple[str, int]]:
    """Names and mtimes of the files the index is built from (a cheap change detector)."""
    state = []
    for pattern in (f"*{sf.MANIFEST_SUFFIX}", f"*{sf.FAILED_SUFFIX}"):
        for path in out_dir.glob(pattern):
            try:
                state.append((path.name, path.stat().st_mtime_ns))
            except FileNotFoundError:  # removed while we looked
                continue
    return sorted(state)


def finalize_index(output_dir: str | Path) -> dict[str, Any]:
    """(Re)build ``index.json`` and ``errors.jsonl`` from the manifests and ledgers on disk.

    Lists every complete shard (manifest present, tar of the recorded size), and says which
    planned shards are missing and which failed. Safe to run at any time, by any number of
    processes: it only reads manifests and replaces two files atomically. Two ranks that
    finish together cannot leave a stale index: each rescans after writing and rebuilds if a
    manifest appeared meanwhile, so the last write always saw every earlier manifest.
    """
    out_dir = Path(output_dir)
    for _ in range(10):
        before = _manifest_state(out_dir)
        index = _build_index(out_dir)
        if _manifest_state(out_dir) == before:
            break
    return index


def _build_index(out_dir: Path) -> dict[str, Any]:
    plan_path = out_dir / sf.PLAN_NAME
    planned = [s["shard"] for s in sf.read_json(plan_path)["shards"]] if plan_path.is_file() else []
    shards, ledger_lines, failed = [], [], []
    totals: Counter[str] = Counter()
    fingerprints, encoders = set(), {}
    done = set()
    for mpath in sorted(out_dir.glob(f"*{sf.MANIFEST_SUFFIX}")):
        stem = mpath.name[: -len(sf.MANIFEST_SUFFIX)]
        try:
            manifest = sf.read_json(mpath)
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("%s: unreadable manifest, shard left out of the index: %s", mpath, exc)
            continue
        tar = out_dir / manifest["name"]
        if not tar.is_file() or tar.stat().st_size != manifest["size_bytes"]:
            log.warning("%s: tar missing or of the wrong size, left out of the index", tar)
            continue
        done.add(stem)
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
        ledger = out_dir / f"{stem}{sf.SHARD_LEDGER_SUFFIX}"
        if ledger.is_file():
            ledger_lines.extend(line for line in ledger.read_text("utf-8").splitlines() if line)
    for fpath in sorted(out_dir.glob(f"*{sf.FAILED_SUFFIX}")):
        info = sf.read_json(fpath)
        if info["shard"] in done or (planned and info["shard"] not in planned):
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
        "config_fingerprint": next(iter(fingerprints), None),
        "complete": not missing,
        "missing": missing,
        "failed": failed,
        **encoders,
    }
    atomic_write(out_dir / sf.LEDGER_NAME, "".join(line + "\n" for line in ledger_lines), durable=True)
    atomic_write_json(out_dir / sf.INDEX_NAME, index, durable=True)
    return index
