"""The zero-copy readers: tar members viewed in the mapped file, safetensors viewed in place."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from safetensors.torch import load, save

from scaletrain.data.loader.shard_reader import (
    RawSample,
    ShardFailure,
    iter_stored_samples,
    iter_tar_members,
    read_shard_shuffled,
)
from scaletrain.data.loader.tensor_view import load_tensors_view
from scaletrain.data.shard_format import LATENT_EXT, TEXT_EXT


def test_tensor_view_matches_safetensors_load():
    tensors = {
        "bf16": torch.randn(3, 4, 5).bfloat16(),
        "f16": torch.randn(7).half(),
        "f32": torch.randn(2, 3),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
    }
    blob = save(tensors, metadata={"note": "x"})
    viewed = load_tensors_view(bytearray(blob))
    loaded = load(blob)
    assert set(viewed) == set(loaded)
    for name, tensor in loaded.items():
        assert viewed[name].dtype == tensor.dtype and torch.equal(viewed[name], tensor), name


def test_tensor_view_is_zero_copy():
    blob = bytearray(save({"x": torch.zeros(4)}))
    view = load_tensors_view(blob)["x"]
    blob[-4:] = torch.tensor([2.0]).numpy().tobytes()  # rewrite the last float in the blob
    assert view[-1].item() == 2.0


@pytest.mark.parametrize(
    "blob", [b"", b"\x01\x02", (10**6).to_bytes(8, "little") + b"{}", b"\x02\0\0\0\0\0\0\0{"]
)
def test_tensor_view_rejects_malformed_blobs(blob):
    with pytest.raises(ValueError):
        load_tensors_view(bytearray(blob))


def test_tensor_view_rejects_offsets_outside_the_blob():
    blob = bytearray(save({"x": torch.zeros(4)}))
    with pytest.raises(ValueError, match="do not fit"):
        load_tensors_view(blob[:-4])


def test_stored_samples_view_the_shard(dataset):
    samples = list(iter_stored_samples(dataset.root / "000002.tar"))
    assert [s.position for s in samples] == list(range(12))
    assert [s.key for s in samples] == dataset.shard_keys["000002.tar"]
    for sample in samples:
        _, latent, text, _ = dataset.samples[sample.key]
        assert torch.equal(load_tensors_view(sample.files[LATENT_EXT])["mean"], latent["mean"])
        assert torch.equal(load_tensors_view(sample.files[TEXT_EXT])["pooled"], text["pooled"])


def test_garbage_in_the_middle_of_a_tar_ends_the_shard_as_a_failure(dataset):
    path = dataset.root / "000004.tar"
    data = bytearray(path.read_bytes())
    # Find the 6th sample's first header and overwrite it with garbage.
    sixth = dataset.shard_keys["000004.tar"][5].encode()
    at = data.index(sixth) // 512 * 512
    data[at : at + 512] = b"\xff" * 512
    path.write_bytes(bytes(data))
    items = list(read_shard_shuffled(path, 12, 64, seed=0))
    delivered = sorted(i.position for i in items if isinstance(i, RawSample))
    failure = items[-1]
    assert isinstance(failure, ShardFailure)
    assert delivered == list(range(len(delivered))) and 0 < len(delivered) <= 5
    assert failure.unread == list(range(len(delivered), 12))


def _open_tars(root) -> int:
    import os

    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return sum(link.startswith(str(root)) and link.endswith(".tar") for link in links)


def test_carried_leftovers_do_not_keep_their_shards_mapped(make_dataset):
    """Six buckets and batches of 8: leftovers of many shards wait in the buckets. Only the
    shard being read may stay mapped (Python's mmap holds a duplicate file descriptor)."""
    from scaletrain.data.loader import DataConfig, build_train_loader

    buckets = tuple((64, 64 + 32 * i) for i in range(6))
    data = make_dataset(num_shards=8, per_shard=12, buckets=buckets)
    config = DataConfig(path=str(data.root), batch_size=8, num_workers=0)
    loader = build_train_loader(config, 0, 1, 0)
    it = iter(loader)
    most = 0
    for _ in range(30):  # 96 samples / 8 = 12 batches an epoch: 2.5 epochs
        next(it)
        most = max(most, _open_tars(data.root))
    assert most <= 2


def test_the_loader_leaves_the_global_rng_alone(dataset):
    from scaletrain.data.loader import DataConfig, build_train_loader

    config = DataConfig(path=str(dataset.root), batch_size=4, num_workers=0)
    loader = build_train_loader(config, 0, 1, 0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(iter(loader))
    next(iter(loader))
    assert torch.equal(torch.rand(3), expected)



def _reader(data: bytes):
    """``read(n)`` over ``data``, as the mapped and streamed shard readers give it."""
    offset = 0

    def read(n):
        nonlocal offset
        chunk = memoryview(data)[offset:offset + n]
        offset += len(chunk)
        return chunk

    return read


def _members_by_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_parser_agrees_with_tarfile(fmt):
    """The loader's header parser yields the regular members tarfile reads, byte for byte:
    ustar prefix/name splits, GNU long names, pax paths, empty and block-sized files; a
    directory, a symlink and a pax global header are skipped."""
    rng = torch.Generator().manual_seed(0)
    files = {"a.txt": b"", "b.json": b"{}", "c.bin": bytes(512),
             "d.bin": bytes(torch.randint(0, 256, (1537,), generator=rng).to(torch.uint8)),
             f"{'p' * 120}/{'n' * 90}.x": b"ustar prefix split"}
    if fmt != tarfile.USTAR_FORMAT:
        files[f"{'k' * 300}.txt"] = b"long name"
    buf = io.BytesIO()
    pax = {"comment": "global"} if fmt == tarfile.PAX_FORMAT else None
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax) as tar:
        directory = tarfile.TarInfo("dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
        tar.addfile(link)
    data = buf.getvalue()
    ours = [(name, bytes(view)) for name, view in iter_tar_members(_reader(data))]
    assert ours == _members_by_tarfile(data)
    assert sorted(name for name, _ in ours) == sorted(files)


@pytest.mark.parametrize("damage", ["checksum", "truncated data", "truncated header",
                                    "not a tar"])
def test_tar_parser_refuses_damaged_tars(damage):
    """A flipped header byte, data or a header cut short, and a file that is no tar at all:
    a ReadError (the shard fails and is named), never members made of garbage."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        # blocks: pax header, its record, the member's own header, then its data
        info = tarfile.TarInfo("k" * 120 + ".bin")
        info.size = 2000
        tar.addfile(info, io.BytesIO(bytes(2000)))
    data = bytearray(buf.getvalue())
    assert len(list(iter_tar_members(_reader(bytes(data))))) == 1  # intact: read
    if damage == "checksum":
        data[2 * 512 + 10] ^= 1  # a byte of the member's own header's name
    elif damage == "truncated data":
        data = data[: 3 * 512 + 100]
    elif damage == "truncated header":
        data = data[: 2 * 512 + 100]
    else:
        data = bytearray(b"<html><body>not a tar</body></html>" + bytes(2000))
    with pytest.raises(tarfile.ReadError):
        list(iter_tar_members(_reader(bytes(data))))
