"""Read back what wandb wrote offline: the history rows and run record of a ``.wandb`` file.

wandb 0.31 ships no Python reader for its transaction log, so this is a small one. The file
is a LevelDB-style log (the format wandb-core writes): a 7-byte header (``:W&B``, magic
0xBEE1, version 0), then 32 KiB blocks of records, each ``crc32 (4) | length (2) | type (1)
| payload``, where type FULL/FIRST/MIDDLE/LAST reassembles payloads split across blocks and
each payload is a serialised ``wandb_internal_pb2.Record``. Used by tests and to inspect
offline runs on machines that cannot sync.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

_HEADER = b":W&B"
_HEADER_LEN = 7
_BLOCK = 32 * 1024
_RECORD_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_record_payloads(path: str | Path) -> Iterator[bytes]:
    """Yield the raw protobuf payload of each record in a ``.wandb`` file."""
    data = Path(path).read_bytes()
    if data[:4] != _HEADER:
        raise ValueError(f"{path}: not a wandb transaction log (header {data[:4]!r})")
    pos, pending = _HEADER_LEN, b""
    while pos + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left_in_block
            continue
        payload = data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            yield pending + payload
            pending = b""
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")


def read_wandb_file(path: str | Path, wait_s: float = 10.0) -> dict:
    """The run record and history rows of one finished run's ``.wandb`` file.

    Returns ``{"run": {"id", "name", "project", "config"}, "history": [row, ...]}`` where each
    row maps metric keys (nested keys joined by ``/``) to decoded JSON values.

    wandb-core may still be writing the file for a moment after ``run.finish()`` returns
    (seen with wandb 0.31 when two runs of one id start within the same second), so this
    waits up to ``wait_s`` seconds for the run's closing ``exit`` record.
    """
    deadline = time.monotonic() + wait_s
    while True:
        out = _parse(path)
        if out["finished"] or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)


def _parse(path: str | Path) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"run": None, "history": [], "finished": False}
    for payload in iter_record_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config = {item.key: json.loads(item.value_json) for item in run.config.update}
            out["run"] = {
                "id": run.run_id,
                "name": run.display_name,
                "project": run.project,
                "config": config,
            }
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "exit":
            out["finished"] = True
    return out


def offline_run_files(run_dir: str | Path) -> list[Path]:
    """The ``.wandb`` files of every offline run under ``run_dir/wandb``, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
