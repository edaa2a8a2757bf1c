"""Read one latent shard: samples in stored order with their positions, then a seeded shuffle.

A sample's *position* is its index in the tar's stored order; it is how progress is recorded
(:mod:`.progress`). The shuffle is a seeded buffer shuffle applied to the full stored stream,
*before* already-consumed samples are filtered out by the caller: the random draws therefore
do not depend on what was consumed, and a resumed run replays exactly the order it left.

A read error (truncated or corrupt tar, missing file, an object-store read that still fails
after its retries) ends the shard: the samples read so far are still delivered (in their
shuffled order), followed by one :class:`ShardFailure` naming the positions never read, which
the loader counts as lost. No exception escapes.

Local shards are memory-mapped (:func:`iter_stored_samples`); shards in object storage are
streamed through :class:`~scaletrain.data.storage.RemoteStream` (ranged reads fetched ahead,
retried) and parsed as they arrive (:func:`iter_streamed_samples`), one copy per member.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import random
import struct
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from scaletrain.data import storage
from scaletrain.data.shard_format import member_checksum
from scaletrain.data.storage import ReadStats, RemoteStream, StorageConfig

logger = logging.getLogger(__name__)


@dataclass
class RawSample:
    """The undecoded files of one sample (extension -> bytes) and its stored position."""

    position: int
    key: str
    files: dict[str, memoryview]  # extension -> the file's bytes (a view of the mapped tar)
    # extension -> checksum of the bytes (shard_format.member_checksum), computed by the
    # reader thread when asked, beside the consumer's own work.
    checksums: dict[str, int] | None = None


@dataclass
class ShardFailure:
    """The shard stopped early: ``unread`` positions were never delivered."""

    unread: list[int]
    reason: str


_BLOCK = 512
_END_BLOCK = bytes(_BLOCK)
# tarfile's REGULAR_TYPES: a file ("0", or NUL from pre-POSIX tars) and a contiguous file.
_REGULAR = (b"0", b"\0", b"7")


def _number(field: bytes, what: str) -> int:
    """A header's numeric field: NUL/space-terminated octal, or GNU base-256 (high bit set)."""
    if field[0] & 0x80:
        if field[0] != 0x80:
            raise tarfile.ReadError(f"{what}: negative number in a header")
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError(f"{what}: invalid header") from None


def _parse_header(block: bytes) -> tuple[bytes, int, str]:
    """(type flag, size, name) of one 512-byte header, its checksum verified (as tarfile
    does: unsigned or signed byte sum with the checksum field read as spaces)."""
    stored = _number(block[148:156], "header checksum")
    unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
    if stored != unsigned and stored != sum(struct.unpack_from("148b8x356b", block)) + 256:
        raise tarfile.ReadError("invalid header (bad checksum): not a tar file, or damaged")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":  # POSIX ustar: long paths are split into prefix/name
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    text = name.decode("utf-8", "surrogateescape")
    return block[156:157], _number(block[124:136], text), text


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax extended header ("LEN key=value\n" each)."""
    records, pos = {}, 0
    try:
        while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            key, _, value = data[space + 1:pos + length - 1].partition(b"=")
            records[key] = value
            pos += length
    except ValueError:
        raise tarfile.ReadError("invalid pax header") from None
    return records


def iter_tar_members(read) -> Iterator[tuple[str, memoryview]]:
    """(name, bytes) of each regular member of a tar, in stored order. ``read(n)`` returns
    the next n bytes (fewer only at the end of the data). Handles ustar, pax (path and size
    records) and GNU long names, what tarfile and webdataset write; other member types are
    skipped. Raises tarfile.ReadError on a damaged header or truncated data.

    The loader's own parser rather than :mod:`tarfile`: the same checks on a 512-byte block
    in a few C-level operations, where tarfile's TarInfo parsing took about a third of the
    loader's time per sample at SDXL sizes (two headers per member with pax).
    """
    long_name: str | None = None
    pax_size: int | None = None
    while True:
        block = read(_BLOCK)
        if len(block) == 0:
            return  # the end without the end-of-archive blocks: tolerated, as tarfile does
        if len(block) < _BLOCK:
            raise tarfile.ReadError("unexpected end of data in a header")
        if block == _END_BLOCK:
            return
        kind, size, name = _parse_header(bytes(block))
        if pax_size is not None:
            size, pax_size = pax_size, None
        data = read(-(-size // _BLOCK) * _BLOCK)
        if len(data) < size:
            raise tarfile.ReadError(f"{long_name or name}: unexpected end of data")
        data = data[:size]
        if kind == b"x":  # pax header of the next member
            records = _pax_records(bytes(data))
            if b"path" in records:
                long_name = records[b"path"].decode("utf-8", "surrogateescape")
            if b"size" in records:
                pax_size = int(records[b"size"])
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = bytes(data).rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        name, long_name = long_name or name, None
        if kind in _REGULAR:
            yield name, data


def group_samples(members: Iterator[tuple[str, memoryview]]) -> Iterator[RawSample]:
    """Consecutive members grouped by key (the WebDataset convention, ``{key}.{ext}``, split
    as webdataset does) into samples numbered by stored position."""
    key: str | None = None
    files: dict[str, memoryview] = {}
    position = 0
    for name, data in members:
        prefix, ext = base_plus_ext(name)
        if prefix is None or prefix.rsplit("/", 1)[-1].startswith("__"):
            continue  # not a sample file, or WebDataset metadata
        if prefix != key:
            if key is not None:
                yield RawSample(position, key, files)
                position += 1
            key, files = prefix, {}
        files[ext] = data
    if key is not None:
        yield RawSample(position, key, files)


def iter_stored_samples(path: str | Path) -> Iterator[RawSample]:
    """The samples of one local tar in stored order. Raises on read errors.

    A member's data is a zero-copy view of the file mapped into memory (a private copy-on-
    write mapping, so that tensors can view it and nothing is ever written back).
    WebDataset's own streaming iterator copies each member three times (10 KiB reads, a
    join, a slice), which made it about half as fast on latent shards of SDXL size (see
    docs/benchmarks.md).
    """
    with open(path, "rb") as stream:
        if os.fstat(stream.fileno()).st_size == 0:
            raise tarfile.ReadError("empty file")
        mapped = memoryview(mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_COPY))
    offset = 0

    def read(n: int) -> memoryview:
        nonlocal offset
        view = mapped[offset:offset + n]
        offset += len(view)
        return view

    yield from group_samples(iter_tar_members(read))


def iter_streamed_samples(stream) -> Iterator[RawSample]:
    """The samples of a tar read front to back from ``stream`` (``readinto``), one copy per
    member. Raises on read errors."""

    def read(n: int) -> memoryview:
        buffer = bytearray(n)
        got = 0
        while got < n:
            k = stream.readinto(memoryview(buffer)[got:])
            if not k:
                break
            got += k
        return memoryview(buffer)[:got]

    yield from group_samples(iter_tar_members(read))


def iter_remote_samples(url: str, cfg: StorageConfig, stats: ReadStats | None = None,
                        size: int | None = None) -> Iterator[RawSample]:
    """The samples of a shard in object storage, streamed (see the module docstring);
    ``size`` (from the index) saves asking the store for it."""
    with RemoteStream(url, cfg, stats, total=size) as stream:
        yield from iter_streamed_samples(stream)


class ReadTimeout(OSError):
    """A shard read delivered nothing for ``read_timeout_s`` (a hung mount, a FIFO)."""


# Reader threads left blocked by a timed-out read, by path: while one is still stuck, the
# shard fails at once in later epochs instead of leaving one more thread behind each time.
_STUCK: dict[str, threading.Thread] = {}


def iter_with_timeout(samples: Iterator[RawSample], timeout_s: float, path: str | Path,
                      checksum: bool = False) -> Iterator[RawSample]:
    """``samples`` read in a helper thread; raises ReadTimeout when the next sample takes
    longer than ``timeout_s``. A read blocked in the kernel (open() of a FIFO, a hung NFS
    server) cannot be interrupted: its daemon thread is left behind, holding one file, and
    the shard is given up. The samples' bytes are views of the mapped file, so a mount that
    hangs after the headers were read stalls the reader itself (see docs/data_loader.md)."""
    stuck = _STUCK.get(str(path))
    if stuck is not None and stuck.is_alive():
        samples.close()
        raise ReadTimeout("an earlier read of this shard is still blocked (it ran past "
                          "data.storage.read_timeout_s); a hung mount, or not a regular file?")
    handoff: queue.Queue = queue.Queue(maxsize=8)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for sample in samples:
                if checksum:
                    sample.checksums = {ext: member_checksum(data)
                                        for ext, data in sample.files.items()}
                if not put(("sample", sample)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
            put(("error", exc))
        finally:
            samples.close()

    reader = threading.Thread(target=produce, daemon=True, name=f"read {path}")
    reader.start()
    blocked = False
    try:
        while True:
            try:
                kind, value = handoff.get(timeout=timeout_s)
            except queue.Empty:
                _STUCK[str(path)] = reader
                blocked = True
                raise ReadTimeout(f"no data for {timeout_s:g} s (data.storage.read_timeout_s); "
                                  "a hung mount, or not a regular file?") from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        if not blocked:  # the shard is closed (unmapped) before the next one opens
            reader.join()


def iter_samples(path: str | Path, cfg: StorageConfig | None = None,
                 stats: ReadStats | None = None, size: int | None = None,
                 checksum: bool = False) -> Iterator[RawSample]:
    """The samples of a local or remote shard in stored order. Local reads are bounded by
    ``cfg.read_timeout_s`` (remote ones by the store's retries); with ``checksum`` the
    reader thread fills in each sample's member checksums."""
    cfg = cfg or StorageConfig()
    if storage.is_local(path):
        samples = iter_stored_samples(storage.local_path(path))
        if cfg.read_timeout_s > 0:
            return iter_with_timeout(samples, cfg.read_timeout_s, path, checksum)
        return samples
    return iter_remote_samples(str(path), cfg, stats, size)


def read_shard_shuffled(
    path: str | Path, expected: int, buffer_size: int, seed: int,
    cfg: StorageConfig | None = None, stats: ReadStats | None = None,
    size: int | None = None, checksum: bool = False,
) -> Iterator[RawSample | ShardFailure]:
    """The samples of one shard in a seeded shuffled order, then a ShardFailure if it stopped
    short of ``expected`` samples.

    The shuffle keeps ``buffer_size`` samples; each new one takes the place of a uniformly
    chosen buffered one, which is emitted; the rest is drained in random order. With a buffer
    at least as large as the shard this is a uniform permutation (Fisher-Yates on the drain).
    """
    rng = random.Random(seed)
    buffer: list[RawSample] = []
    delivered = 0
    failure: str | None = None
    extra = 0
    source = None
    try:
        while True:
            try:
                if source is None:
                    source = iter_samples(path, cfg, stats, size, checksum)
                sample = next(source)
            except StopIteration:
                break
            except Exception as exc:  # any read error ends this shard, never the run
                failure = f"{type(exc).__name__}: {exc}"
                break
            if sample.position >= expected:
                extra += 1  # beyond the index's count: progress has no place for it
                continue
            delivered += 1
            if buffer_size <= 1:
                yield sample
            elif len(buffer) < buffer_size:
                buffer.append(sample)
            else:
                j = int(rng.random() * buffer_size)
                buffer[j], sample = sample, buffer[j]
                yield sample
    finally:
        if source is not None:
            source.close()
    while buffer:
        j = int(rng.random() * len(buffer))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()
    if extra:
        logger.warning(
            "%s: %d samples beyond the index's count of %d ignored", path, extra, expected
        )
    if delivered < expected:
        reason = failure or f"the tar holds {delivered} samples, the index says {expected}"
        yield ShardFailure(unread=list(range(delivered, expected)), reason=reason)
