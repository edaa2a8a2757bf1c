"""Where data lives: local paths, ``s3://bucket/prefix``, or any fsspec URL.

One module for every byte the data package reads or writes outside the run directory: the
loader's index, manifests and shards, and preprocessing's raw input and latent output. Local
paths keep the fast local code (memory-mapped shards, atomic renames); a URL goes through
fsspec (``s3://`` through s3fs, pinned in pyproject.toml; another scheme works where its
fsspec library is installed). A scheme fsspec does not know is refused with the key that
named it, never taken for a local directory called ``foo:``.

Credentials and the endpoint come from the S3 client's usual environment and files
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` for MinIO, Ceph and other non-AWS stores); ``data.storage.*`` overrides
the endpoint, region and profile. Secret keys are deliberately not config keys: a run saves
its config in the run directory and in wandb.

Reads of shards stream (:class:`RemoteStream`): fixed-size ranged reads, ``read_ahead`` of
them in flight ahead of the reader, so about ``read_ahead + 1`` blocks in memory per open
shard; a failed read is retried from
the same offset with exponential back-off and counted (``read_retries``); after
``max_retries`` the error reaches the caller, which records the shard as it records a bad
local shard. Writes are one object each: an object store publishes an object only when its
upload completes, so a reader never sees half a shard (locally: temporary name, then rename).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.session
import fsspec
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from scaletrain.core.config_base import ConfigError, require
from scaletrain.core.files import atomic_write

log = logging.getLogger(__name__)

# "s3://b/k", "gs://b/k", "file:///x" (not "C:\x", not a relative path with a colon later).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass
class StorageConfig:
    """How shards in object storage are reached (local paths use only ``read_timeout_s``).

    Memory per open remote shard is about ``block_mb * (read_ahead + 1)``; a DataLoader
    worker has one shard open at a time."""

    # S3 endpoint, e.g. http://minio:9000; "" uses AWS_ENDPOINT_URL or AWS itself.
    endpoint_url: str = ""
    # S3 region; "" uses AWS_DEFAULT_REGION (or the profile's region).
    region: str = ""
    # Named profile of the AWS shared credentials/config files; "" uses the environment's
    # keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the default credential chain.
    profile: str = ""
    # Extra fsspec storage options for the URL's filesystem (e.g. {anon: true}).
    options: dict[str, Any] = field(default_factory=dict)
    # Bytes per ranged read of a shard, in MiB.
    block_mb: float = 16.0
    # Ranged reads in flight ahead of the reader (each block_mb).
    read_ahead: int = 2
    # Retries of one failed read (connection dropped, time-out, 5xx) before the shard is
    # given up for this epoch and recorded as failed.
    max_retries: int = 5
    # Seconds before the first retry; each further retry waits twice as long (max 30 s).
    retry_backoff_s: float = 0.5
    # Seconds a read of a local (or network-mounted) shard may go without delivering a sample
    # before the shard is given up for this epoch: named, its samples counted as lost, and
    # training goes on. A hung mount must not hang training. 0 waits forever.
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        require(self.block_mb > 0, "block_mb", f"must be > 0, got {self.block_mb}")
        require(self.read_ahead >= 1, "read_ahead", f"must be >= 1, got {self.read_ahead}")
        require(self.max_retries >= 0, "max_retries", f"must be >= 0, got {self.max_retries}")
        require(self.retry_backoff_s >= 0, "retry_backoff_s", "must be >= 0")
        require(self.read_timeout_s >= 0, "read_timeout_s",
                f"must be >= 0, got {self.read_timeout_s}")

    @property
    def block_bytes(self) -> int:
        return max(4096, int(self.block_mb * (1 << 20)))


def scheme(url: str) -> str | None:
    """The URL scheme ("s3"), or None for a local path (a ``file://`` URL counts as local)."""
    match = _SCHEME.match(str(url))
    if match is None:
        return None
    name = match.group(1).lower()
    return None if name == "file" else name


def is_local(url: str | Path) -> bool:
    return scheme(str(url)) is None


def local_path(url: str | Path) -> Path:
    text = str(url)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def check_url(url: str, key: str) -> None:
    """Refuse a URL whose scheme no installed fsspec filesystem handles, naming ``key``."""
    name = scheme(url)
    if name is None:
        return
    try:
        fsspec.get_filesystem_class(name)
    except ValueError:
        raise ConfigError(
            f"{key}: unknown scheme {name!r} in {url!r}; give a local path, s3://bucket/prefix, "
            "or a URL of an installed fsspec filesystem"
        ) from None
    except ImportError as exc:
        raise ConfigError(f"{key}: {url!r} needs a library that is not installed: {exc}") from None


def check_local(url: str, key: str) -> None:
    """Refuse a URL where only a local path is handled (run directories, exports, samples):
    taken as a path, ``s3://b/x`` would create a local folder named ``s3:``."""
    name = scheme(url)
    if name is not None:
        raise ConfigError(f"{key}: {url!r} is a {name}: URL; this takes a local path only")


def join(base: str | Path, name: str) -> str:
    """``base/name`` for a local directory or a URL prefix."""
    if is_local(base):
        return str(local_path(base) / name)
    return str(base).rstrip("/") + "/" + name


def _options(url: str, cfg: StorageConfig, reader: bool) -> dict[str, Any]:
    opts: dict[str, Any] = dict(cfg.options)
    if scheme(url) == "s3":
        client = dict(opts.pop("client_kwargs", {}))
        if cfg.endpoint_url:
            opts["endpoint_url"] = cfg.endpoint_url
        if cfg.region:
            client["region_name"] = cfg.region
        if cfg.profile:
            opts["profile"] = cfg.profile
        if client:
            opts["client_kwargs"] = client
        if reader:
            # The stream retries and counts failed reads itself; retries inside botocore
            # would hide them (and multiply with ours).
            config = dict(opts.pop("config_kwargs", {}))
            config["retries"] = {"total_max_attempts": 1}
            opts["config_kwargs"] = config
    return opts


def filesystem(url: str, cfg: StorageConfig | None = None, reader: bool = False):
    """(fsspec filesystem, path inside it) of a URL."""
    cfg = cfg or StorageConfig()
    fs, path = fsspec.core.url_to_fs(str(url), **_options(str(url), cfg, reader))
    if reader and scheme(url) == "s3":
        fs.retries = 1  # s3fs's own retry loop, likewise (a cached instance of our own)
    return fs, path


# --------------------------------------------------------------------------- small files


def size(url: str | Path, cfg: StorageConfig | None = None) -> int | None:
    """Bytes of a file or object, None when absent."""
    if is_local(url):
        p = local_path(url)
        return p.stat().st_size if p.is_file() else None
    fs, path = filesystem(str(url), cfg)
    try:
        return int(fs.info(path)["size"])
    except FileNotFoundError:
        return None


def read_bytes(url: str | Path, cfg: StorageConfig | None = None) -> bytes:
    if is_local(url):
        return local_path(url).read_bytes()
    fs, path = filesystem(str(url), cfg)
    return fs.cat_file(path)


def read_json(url: str | Path, cfg: StorageConfig | None = None) -> Any:
    return json.loads(read_bytes(url, cfg))


def write_bytes(url: str | Path, data: bytes | str, cfg: StorageConfig | None = None) -> None:
    """Write one file or object whole: a reader sees the old version or the new one."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if is_local(url):
        atomic_write(local_path(url), payload, durable=True)
        return
    fs, path = filesystem(str(url), cfg)
    fs.pipe_file(path, payload)


def write_json(url: str | Path, data: Any, cfg: StorageConfig | None = None) -> None:
    write_bytes(url, json.dumps(data, indent=1, sort_keys=True) + "\n", cfg)


def upload(local: Path, url: str, cfg: StorageConfig | None = None) -> None:
    """Copy a finished local file to ``url`` as one object (multipart uploads too become
    visible only when complete)."""
    fs, path = filesystem(url, cfg)
    fs.put_file(str(local), path)


def remove(url: str | Path, cfg: StorageConfig | None = None) -> None:
    if is_local(url):
        local_path(url).unlink(missing_ok=True)
        return
    fs, path = filesystem(str(url), cfg)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def listing(url: str | Path, suffix: str, cfg: StorageConfig | None = None
            ) -> dict[str, tuple[str, int]]:
    """{file name: (version tag, size)} of the files directly under ``url`` whose names end
    with ``suffix``, from one listing. The tag (mtime, or an object's ETag) changes when a
    file is rewritten: a cheap change detector."""
    out: dict[str, tuple[str, int]] = {}
    if is_local(url):
        for p in local_path(url).glob(f"*{suffix}"):
            try:
                st = p.stat()
            except FileNotFoundError:  # removed while we looked
                continue
            if p.is_file():
                out[p.name] = (str(st.st_mtime_ns), st.st_size)
        return out
    fs, path = filesystem(str(url), cfg)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return out
    for entry in entries:
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") == "file" and name.endswith(suffix):
            tag = entry.get("ETag") or entry.get("mtime") or entry.get("LastModified")
            out[name] = (str(tag), int(entry.get("size") or 0))
    return out


def glob_urls(pattern: str, cfg: StorageConfig | None = None) -> list[str]:
    """Expand a glob over a URL (``s3://b/raw/*.tar``) into full URLs, sorted."""
    fs, path = filesystem(pattern, cfg)
    prefix = pattern[: pattern.index("://") + 3]
    return sorted(prefix + p for p in fs.glob(path))


# --------------------------------------------------------------------------- streaming


class ReadStats:
    """Counters of one process's remote reads (retries, bytes), reported with batches. The
    read-ahead threads add to them, hence the lock."""

    def __init__(self) -> None:
        self.retries = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, retries: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.retries += retries
            self.bytes += nbytes

    def take(self) -> dict[str, int]:
        with self._lock:
            out = {"read_retries": self.retries, "read_bytes": self.bytes}
            self.retries = self.bytes = 0
        return out


class _S3Ranges:
    """Ranged GETs of one s3:// object with botocore's synchronous client, each read straight
    into its block (one copy). For shard reads this costs the reading process a third to a
    half of the CPU of s3fs's asyncio + aiohttp path (measured: 0.18-0.24 s against
    0.35-0.71 s of client CPU per 150 MB), and that CPU is taken from the tar parsing in the
    same process. fsspec remains the path for listing, writing and every other scheme."""

    _clients: dict[tuple, Any] = {}
    _lock = threading.Lock()

    def __init__(self, url: str, cfg: StorageConfig) -> None:
        self.bucket, _, self.key = url[len("s3://"):].partition("/")
        self.client = self._client(cfg)

    @classmethod
    def _client(cls, cfg: StorageConfig):
        # One client per process and settings (building one takes ~0.1 s); keyed by the
        # pid too, since a forked DataLoader worker must not share its parent's connections.
        key = (os.getpid(), cfg.endpoint_url, cfg.region, cfg.profile, cfg.read_ahead)
        with cls._lock:
            if key not in cls._clients:
                session = botocore.session.Session(profile=cfg.profile or None)
                config = BotoConfig(retries={"total_max_attempts": 1},  # ours count them
                                    max_pool_connections=cfg.read_ahead + 1)
                cls._clients[key] = session.create_client(
                    "s3", region_name=cfg.region or None,
                    endpoint_url=cfg.endpoint_url or None, config=config)
            return cls._clients[key]

    def _call(self, **kwargs):
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "NoSuchBucket", "404"):
                raise FileNotFoundError(f"s3://{self.bucket}/{self.key}: {code}") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise PermissionError(f"s3://{self.bucket}/{self.key}: {code}") from None
            raise

    def size(self) -> int:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"s3://{self.bucket}/{self.key}") from None
            raise
        return int(head["ContentLength"])

    def read(self, start: int, end: int) -> bytearray:
        body = self._call(Range=f"bytes={start}-{end - 1}")["Body"]
        buf = bytearray(end - start)
        view, got = memoryview(buf), 0
        try:
            while got < len(buf):
                n = body._raw_stream.readinto(view[got:])  # urllib3: into our buffer
                if not n:
                    break
                got += n
        finally:
            body.close()
        if got != len(buf):
            raise OSError(f"short read: {got} of {len(buf)} bytes at {start}")
        return buf


class _FsspecRanges:
    """Ranged reads of an object through its fsspec filesystem (any scheme)."""

    def __init__(self, url: str, cfg: StorageConfig) -> None:
        self.fs, self.path = filesystem(url, cfg, reader=True)

    def size(self) -> int:
        return int(self.fs.info(self.path)["size"])

    def read(self, start: int, end: int) -> bytes:
        data = self.fs.cat_file(self.path, start=start, end=end)
        if len(data) != end - start:
            raise OSError(f"short read: {len(data)} of {end - start} bytes at {start}")
        return data


class RemoteStream:
    """A read-only, forward-only file over an object: ranged reads of ``block_mb``, up to
    ``read_ahead`` of them in flight at once ahead of the reader, each retried from its
    offset.

    Memory is bounded by (read_ahead + 1) blocks whatever the object's size. A read that
    still fails after ``max_retries`` raises ``OSError`` from :meth:`read` at that point:
    everything before it was delivered."""

    def __init__(self, url: str, cfg: StorageConfig, stats: ReadStats | None = None,
                 total: int | None = None) -> None:
        self.url = url
        self.cfg = cfg
        self.stats = stats or ReadStats()
        # s3:// with no extra fsspec options: botocore directly (see _S3Ranges).
        fast = scheme(url) == "s3" and not cfg.options
        self._ranges = _S3Ranges(url, cfg) if fast else _FsspecRanges(url, cfg)
        self._stop = threading.Event()
        self.size = total if total is not None else self._retry(self._ranges.size)
        # Several ranged reads in flight hide the round trip of each.
        self._pool = ThreadPoolExecutor(max_workers=cfg.read_ahead,
                                        thread_name_prefix="shard-read-ahead")
        self._pending: deque[Future] = deque()
        self._next_start = 0
        self._current = memoryview(b"")
        self._pos = 0
        self._fill()

    def _retry(self, fn, *args):
        delay = self.cfg.retry_backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            try:
                return fn(*args)
            except (FileNotFoundError, PermissionError, IsADirectoryError):
                raise  # not transient: a retry cannot help
            except Exception as exc:  # noqa: BLE001 - any transport error may be transient
                if attempt == self.cfg.max_retries or self._stop.is_set():
                    raise OSError(f"{self.url}: read failed after {attempt + 1} attempts: "
                                  f"{type(exc).__name__}: {exc}") from exc
                self.stats.add(retries=1)
                log.debug("%s: retry %d after %s", self.url, attempt + 1, exc)
                if self._stop.wait(min(delay, 30.0)):
                    raise
                delay *= 2
        raise AssertionError("unreachable")

    def _read_range(self, start: int, end: int) -> bytes | bytearray:
        data = self._ranges.read(start, end)
        self.stats.add(nbytes=len(data))
        return data

    def _fill(self) -> None:
        block = self.cfg.block_bytes
        while len(self._pending) < self.cfg.read_ahead and self._next_start < self.size:
            start, end = self._next_start, min(self._next_start + block, self.size)
            self._pending.append(self._pool.submit(self._retry, self._read_range, start, end))
            self._next_start = end

    def _next_block(self) -> bool:
        if not self._pending:
            return False
        future = self._pending.popleft()
        try:
            data = future.result()
        except BaseException as exc:
            self.close()
            raise exc if isinstance(exc, OSError) else OSError(str(exc)) from exc
        self._fill()
        self._current, self._pos = memoryview(data), 0
        return True

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` (fewer bytes only at the end of the object)."""
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target):
            if self._pos >= len(self._current) and not self._next_block():
                break
            n = min(len(target) - filled, len(self._current) - self._pos)
            target[filled:filled + n] = self._current[self._pos:self._pos + n]
            self._pos += n
            filled += n
        return filled

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while True:
                chunk = self.read(1 << 20)
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._stop.set()
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_blocks(url: str, cfg: StorageConfig, stats: ReadStats | None = None
                ) -> Iterator[bytes]:
    """The bytes of a remote object in blocks, through a :class:`RemoteStream`."""
    with RemoteStream(url, cfg, stats) as stream:
        while True:
            chunk = stream.read(cfg.block_bytes)
            if not chunk:
                return
            yield chunk
