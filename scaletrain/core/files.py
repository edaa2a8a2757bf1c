"""Writing files so that a reader never sees half of one.

Every file is written under a temporary name private to this host and process, then renamed
over its final name (``os.replace`` is atomic on POSIX file systems): concurrent writers (array
tasks rebuilding one index, ranks of two jobs) never interleave bytes, and a crash leaves the
previous version in place. ``durable=True`` also fsyncs the file before the rename and the
directory after it, so that after a power loss the new name never points at short contents.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_name(path: str | Path) -> Path:
    """A sibling of ``path`` that no other host or process writes."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it, which
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: set and restore at once
    os.umask(mask)
    return mask


def readable_per_umask(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would: 0666 (0777 for folders) minus the umask.

    Some writers (safetensors' ``save_file``) create files 0600 whatever the umask, so exports
    and samples meant for teammates would be readable by their owner only."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    For writers that want a file name (``Image.save``, ``torch.save``, a tar writer)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        readable_per_umask(tmp)
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str, durable: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns ``path``."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_output(path, durable=durable) as tmp, open(tmp, "wb") as fh:
        fh.write(payload)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, durable: bool = False) -> Path:
    return atomic_write(path, json.dumps(data, indent=1, sort_keys=True) + "\n", durable)


def sha256_file(path: str | Path, chunk_bytes: int = 8 << 20) -> str:
    """The hex sha256 of a file, read in chunks (constant memory for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
