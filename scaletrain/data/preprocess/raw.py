"""Read raw shards in img2dataset's layout: one group of files per sample key.

A raw shard is a tar whose members are named ``{key}.{ext}`` (the key may contain folders;
the extension starts at the first dot of the file name, as in WebDataset). The files of one
sample are consecutive. :func:`iter_raw_samples` streams a shard (a local path; an object-store
URL such as ``s3://bucket/raw/00001.tar``, read with retries through
:mod:`scaletrain.data.storage`; or any other URL ``webdataset.gopen`` opens, such as
``pipe:aws s3 cp s3://bucket/00001.tar -`` or ``https://...``) and yields one
:class:`RawSample` per group, plus :class:`TarProblem` when the archive is damaged.

Damage is told apart from a failed download:

* a tar that ends early (no end-of-archive marker, a partial block, a member cut short) or
  has a broken header is *data*: the groups read before the damage are yielded, the damage
  is reported as a TarProblem, and the shard completes with what it had;
* an error opening or reading the stream (missing file, a ``pipe:`` command exiting
  non-zero) raises :class:`ShardReadError`: the shard is not completed, so a rerun retries
  it, instead of freezing a transient network failure into a permanently short shard.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import webdataset as wds
from webdataset.gopen import gopen_schemes

from scaletrain.data import storage
from scaletrain.data.storage import RemoteStream, StorageConfig

BLOCK = 512
# A tar ends with two zero blocks (POSIX.1-1988); a stream without them was cut short.
END_MARKER = b"\0" * (2 * BLOCK)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]+)$")


class ShardReadError(OSError):
    """The shard's bytes could not be read at all, or the reader failed: retry later."""


@dataclass
class RawSample:
    key: str
    files: dict[str, bytes] = field(default_factory=dict)  # extension (lowercase) -> bytes
    truncated: bool = False  # the archive ended while this group was being read


@dataclass
class TarProblem:
    code: str  # "truncated_tar" or "corrupt_tar"
    reason: str


@dataclass
class StreamStats:
    """Filled in while reading: what was read, for the manifest."""

    sha256: str = ""
    num_bytes: int = 0
    num_members: int = 0


def split_key(name: str) -> tuple[str, str] | None:
    """``a/b/000123.jpg`` -> (``a/b/000123``, ``jpg``); None for names with no extension."""
    match = _KEY_EXT.match(name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


class _HashingReader:
    """Wraps a binary stream: hashes and counts every byte and keeps the last 1 KiB."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.hash.update(data)
            self.count += len(data)
            self.tail = (self.tail + data)[-len(END_MARKER) :]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.raw.close()


def uses_fsspec(url: str) -> bool:
    """Object-store URLs (s3://, and any fsspec scheme webdataset has no opener for)."""
    name = storage.scheme(url)
    return name is not None and name not in gopen_schemes


def open_url(url: str, cfg: StorageConfig | None = None):
    """A binary stream for a local path, an object-store URL, or a URL webdataset
    understands (pipe:, http...)."""
    if uses_fsspec(url):
        storage.check_url(url, "--input")
        return RemoteStream(url, cfg or StorageConfig())
    if ":" in url.split("/", 1)[0] and not re.match(r"^[A-Za-z]:[\\/]", url):
        return wds.gopen(url, "rb")
    return open(storage.local_path(url), "rb")


def iter_raw_samples(
    url: str, stats: StreamStats | None = None, cfg: StorageConfig | None = None
) -> Iterator[RawSample | TarProblem]:
    """Yield the sample groups of one raw shard in archive order (see module docstring)."""
    stats = stats if stats is not None else StreamStats()
    try:
        stream = _HashingReader(open_url(url, cfg))
    except OSError as exc:
        raise ShardReadError(f"{url}: cannot open: {exc}") from exc
    current: RawSample | None = None
    problem: TarProblem | None = None
    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as archive:
                for member in archive:
                    stats.num_members += 1
                    if not member.isfile():
                        continue
                    parts = split_key(member.name)
                    data = archive.extractfile(member).read()
                    if parts is None:
                        # Not a sample file: report it under its own name so nothing in
                        # the shard goes unaccounted for.
                        if current is not None:
                            yield current
                            current = None
                        yield RawSample(member.name, {"": data})
                        continue
                    key, ext = parts
                    if current is not None and current.key != key:
                        yield current
                        current = None
                    if current is None:
                        current = RawSample(key)
                    current.files[ext] = data
        except tarfile.ReadError as exc:
            problem = TarProblem(
                "truncated_tar"
                if "end of data" in str(exc) or "truncated" in str(exc)
                else "corrupt_tar",
                f"tar archive unreadable after {stats.num_members} members "
                f"({stream.count} bytes): {exc}",
            )
        stream.drain()
    except (OSError, EOFError) as exc:
        raise ShardReadError(f"{url}: read failed: {exc}") from exc
    finally:
        try:
            stream.close()
        except OSError as exc:
            # pipe: streams report a failed command (non-zero exit) here.
            raise ShardReadError(f"{url}: reader failed: {exc}") from exc
    stats.sha256 = stream.hash.hexdigest()
    stats.num_bytes = stream.count
    if problem is not None and stats.num_members == 0:
        # Not a tar at all (a 0-byte file, an HTML error page saved as .tar): failing the
        # shard, instead of committing it as complete with 0 samples, lets a rerun pick up
        # the real file once it is there (issue 14).
        raise ShardReadError(f"{url}: not a tar archive ({stream.count} bytes, "
                             f"sha256 {stats.sha256[:12]}): {problem.reason}")
    if problem is None and (stream.count % BLOCK or stream.tail != END_MARKER):
        problem = TarProblem(
            "truncated_tar",
            f"tar archive ends without its end-of-archive marker after {stream.count} bytes "
            f"and {stats.num_members} members (cut short?)",
        )
    if current is not None:
        current.truncated = problem is not None
        yield current
    if problem is not None:
        yield problem
