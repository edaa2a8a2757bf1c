"""End to end: raw tar shards -> latent shards, index, ledger; bad input; reruns; ranks."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scaletrain.data import shard_format as sf
from scaletrain.data.encoders import build_image_encoder
from scaletrain.data.preprocess.output import FingerprintMismatch, finalize_index
from scaletrain.data.preprocess.pipeline import preprocess_shards
from scaletrain.data.synthetic import write_synthetic_shards


def _ledger(out: Path) -> list[dict]:
    text = (out / sf.LEDGER_NAME).read_text()
    return [json.loads(line) for line in text.splitlines() if line]


def _input_groups(path: Path) -> list[str]:
    """Sample keys of a raw tar in archive order, one per consecutive group."""
    import tarfile

    keys: list[str] = []
    with tarfile.open(path) as tf:
        try:
            for m in tf:
                key = m.name.split(".")[0] if "." in m.name else m.name
                if not keys or keys[-1] != key:
                    keys.append(key)
        except tarfile.ReadError:  # a truncated input: the groups whose headers were read
            pass
    return keys


def _assert_nothing_lost(out: Path, inputs: list[Path], read_latent_shard) -> None:
    """Every input sample group ends as one written sample or one ledger line."""
    ledger = [e for e in _ledger(out) if e["key"] is not None]
    for raw in inputs:
        stem = raw.stem
        groups = _input_groups(raw)
        written = list(read_latent_shard(out / f"{stem}.tar"))
        skipped = [e["key"] for e in ledger if e["shard"] == stem]
        assert sorted(written + skipped) == sorted(groups), stem
        manifest = sf.read_json(out / f"{stem}{sf.MANIFEST_SUFFIX}")
        assert manifest["num_input_samples"] == len(groups)
        assert manifest["num_samples"] == len(written)
        assert manifest["num_skipped"] == len(skipped)


# --------------------------------------------------------------------------- the demo


def test_demo_preset_end_to_end(tmp_path, demo_cfg, read_latent_shard):
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=3, samples_per_shard=10)
    cfg = replace(demo_cfg, decode_workers=2)  # decoding in DataLoader worker processes
    summary = preprocess_shards(cfg, pattern, tmp_path / "out")
    out = tmp_path / "out"
    assert (summary.shards_done, summary.samples_written, summary.samples_skipped) == (3, 30, 0)

    index = sf.read_index(out)
    assert index["complete"] and index["missing"] == [] and index["num_samples"] == 30
    assert [s["name"] for s in sf.shard_entries(index)] == ["00000.tar", "00001.tar", "00002.tar"]
    assert index["bucket_counts"] == {"64x64": 30}
    assert index["image_encoder"]["kind"] == "pixel"
    assert index["image_encoder"]["scaling_factor"] == 1.0
    assert index["text_encoder"]["preset"] == "tiny_clip"
    assert (index["text_encoder"]["hidden_dim"], index["text_encoder"]["pooled_dim"]) == (64, 64)
    assert _ledger(out) == []

    manifest = sf.read_json(out / "00001.manifest.json")
    assert manifest["input"]["url"].endswith("00001.tar") and len(manifest["input"]["sha256"]) == 64
    from scaletrain.data.preprocess.output import file_sha256

    assert manifest["sha256"] == file_sha256(out / "00001.tar")

    samples = read_latent_shard(out / "00001.tar")
    assert len(samples) == 10
    latent, text, meta = samples["000010003"]
    assert set(latent) == {"mean", "std"} and set(text) == {"hidden_states", "pooled"}
    assert latent["mean"].shape == (12, 32, 32) and latent["mean"].dtype == torch.float16
    assert torch.equal(latent["std"], torch.zeros_like(latent["std"]))
    assert text["hidden_states"].shape == (5, 64) and text["pooled"].shape == (64,)
    assert meta["original_size"] == [64, 64] and meta["target_size"] == [64, 64]
    assert meta["crop_top_left"] == [0, 0] and meta["bucket"] == [64, 64]
    assert meta["key"] == "000010003" and meta["caption"].startswith("a ")

    # The pixel "latent" decodes to exactly the raw JPEG's pixels.
    import tarfile

    with tarfile.open(tmp_path / "raw" / "00001.tar") as tf:
        jpg = tf.extractfile("000010003.jpg").read()
    raw = torch.from_numpy(np.array(Image.open(io.BytesIO(jpg)).convert("RGB"))).permute(2, 0, 1)
    pixels = build_image_encoder(cfg).decode(latent["mean"][None])[0]
    assert torch.equal(((pixels + 1) * 127.5).round().to(torch.uint8), raw)

    # Same caption, same text tensors; the empty prompt is there for CFG dropout.
    by_caption = {}
    for _, t, m in samples.values():
        if m["caption"] in by_caption:
            assert torch.equal(by_caption[m["caption"]], t["pooled"])
        by_caption[m["caption"]] = t["pooled"]
    from safetensors.torch import load_file

    empty = load_file(out / sf.EMPTY_PROMPT_NAME)
    assert empty["hidden_states"].shape == (2, 64) and empty["pooled"].shape == (64,)


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def bad_shard(tmp_path, image_bytes, write_tar) -> Path:
    def png16():
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(buf, "PNG")
        return buf.getvalue()

    jpg = image_bytes()
    meta = json.dumps({"url": "http://example.com/x.jpg"}).encode()
    members = [
        ("ok_jpg.jpg", jpg), ("ok_jpg.txt", b"a red square"), ("ok_jpg.json", meta),
        ("ok_png.png", image_bytes(fmt="PNG")), ("ok_png.txt", b"a red square"),
        ("ok_webp.webp", image_bytes(fmt="WEBP")), ("ok_webp.txt", "a red square \u2713".encode()),
        ("ok_rgba.png", image_bytes(mode="RGBA", colour=(0, 0, 0, 0), fmt="PNG")),
        ("ok_rgba.txt", b"transparent"),
        ("ok_cmyk.jpg", image_bytes(mode="CMYK", colour=(0, 0, 0, 0))), ("ok_cmyk.txt", b"white"),
        ("ok_gray16.png", png16()), ("ok_gray16.txt", b"grey"),
        ("zero_bytes.jpg", b""), ("zero_bytes.txt", b"a caption"),
        ("corrupt.jpg", b"\xff\xd8\xff garbage " * 20), ("corrupt.txt", b"a caption"),
        ("truncated.jpg", jpg[: len(jpg) // 2]), ("truncated.txt", b"a caption"),
        ("no_caption.jpg", jpg), ("no_caption.json", meta),
        ("no_image.txt", b"a caption"), ("no_image.json", meta),
        ("only_json.json", meta),
        ("not_utf8.jpg", jpg), ("not_utf8.txt", b"caf\xe9 latin-1"),
        ("empty_caption.jpg", jpg), ("empty_caption.txt", b""),
        ("small.jpg", image_bytes(size=(16, 16))), ("small.txt", b"tiny"),
        ("wide.jpg", image_bytes(size=(256, 32))), ("wide.txt", b"a banner"),
        ("bomb.png", image_bytes(size=(200, 200), fmt="PNG")), ("bomb.txt", b"big"),
        ("README", b"not a sample"),
        ("ok_jpg.jpg", jpg), ("ok_jpg.txt", b"again"),  # the same key, not consecutive
    ]  # fmt: skip
    return write_tar(tmp_path / "raw" / "00007.tar", members)


EXPECTED_SKIPS = {
    "zero_bytes": ("empty_file", "0 bytes"),
    "corrupt": ("corrupt_image", "image"),
    "truncated": ("corrupt_image", "cannot decode image"),
    "no_caption": ("missing_caption", "has .jpg, .json"),
    "no_image": ("missing_image", "has .json, .txt"),
    "only_json": ("missing_image", "has .json"),
    "not_utf8": ("caption_not_utf8", "UTF-8"),
    "empty_caption": ("empty_caption", "empty"),
    "small": ("too_small", "16x16 is smaller than min_size=32"),
    "wide": ("aspect_ratio", "aspect ratio 8.00 > max_aspect_ratio=2.0"),
    "bomb": ("decompression_bomb", "40000 pixels > max_image_pixels=20000"),
    "README": ("not_a_sample", "no extension"),
    "ok_jpg": ("duplicate_key", "appears again"),
}


@pytest.mark.parametrize("workers", [0, 3], ids=["in_process", "one_shard_in_3_parts"])
def test_bad_input_is_skipped_with_reasons_and_nothing_is_lost(
    tmp_path, demo_cfg, bad_shard, read_latent_shard, workers
):
    cfg = replace(demo_cfg, max_image_pixels=20000, decode_workers=workers)
    summary = preprocess_shards(cfg, str(bad_shard), tmp_path / "out")
    out = tmp_path / "out"
    ledger = _ledger(out)
    by_key = {e["key"]: e for e in ledger}
    assert len(ledger) == len(by_key) == len(EXPECTED_SKIPS)
    for key, (code, words) in EXPECTED_SKIPS.items():
        assert by_key[key]["code"] == code, (key, by_key[key])
        assert words in by_key[key]["reason"], (key, by_key[key])
        assert by_key[key]["shard"] == "00007"
    written = read_latent_shard(out / "00007.tar")
    assert sorted(written) == ["ok_cmyk", "ok_gray16", "ok_jpg", "ok_png", "ok_rgba", "ok_webp"]
    assert written["ok_jpg"][2]["caption"] == "a red square"  # the first occurrence
    assert written["ok_jpg"][2]["url"] == "http://example.com/x.jpg"
    assert written["ok_webp"][2]["caption"] == "a red square \u2713"
    # Transparent -> white; CMYK (0,0,0,0) -> white; 16-bit 40000 -> 156, not clipped to 255.
    enc = build_image_encoder(cfg)
    for key, value in (("ok_rgba", 255), ("ok_cmyk", 255), ("ok_gray16", 156)):
        pixels = ((enc.decode(written[key][0]["mean"][None]) + 1) * 127.5).round()
        assert abs(float(pixels.mean()) - value) <= 1, key
    assert summary.samples_written == 6 and summary.samples_skipped == len(EXPECTED_SKIPS)
    assert summary.skipped_by_reason["missing_image"] == 2
    _assert_nothing_lost(out, [bad_shard], read_latent_shard)


@pytest.mark.parametrize("workers", [0, 2], ids=["in_process", "two_workers"])
def test_truncated_tars_keep_what_was_read(
    tmp_path, demo_cfg, image_bytes, write_tar, read_latent_shard, workers
):
    demo_cfg = replace(demo_cfg, decode_workers=workers)
    members = []
    for i in range(5):
        members += [
            (f"s{i}.jpg", image_bytes(colour=(i * 40, 0, 0))),
            (f"s{i}.txt", b"a red circle"),
        ]
    full = write_tar(tmp_path / "full.tar", members).read_bytes()
    # Find where s3.txt's data starts: cut inside it, and at the block boundary before s3.
    offsets = {}
    import tarfile

    with tarfile.open(tmp_path / "full.tar") as tf:
        for m in tf:
            offsets[m.name] = (m.offset, m.offset_data)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "00000.tar").write_bytes(full[: offsets["s3.txt"][1] + 5])  # inside a member
    (raw / "00001.tar").write_bytes(full[: offsets["s3.jpg"][0]])  # at a header: no end marker
    (raw / "00002.tar").write_bytes(full[: offsets["s0.jpg"][1] + 100])  # inside the first
    (raw / "00003.tar").write_bytes(b"")  # zero bytes: not a tar (issue 14)
    summary = preprocess_shards(demo_cfg, f"{raw}/{{00000..00003}}.tar", tmp_path / "out")
    out = tmp_path / "out"
    assert summary.shards_done == 3  # damaged shards complete with what they had
    # A file that is no tar at all is not committed as a complete empty shard: it fails
    # (a rerun retries it).
    assert [f["shard"] for f in summary.shards_failed] == ["00003"]
    ledger = _ledger(out)
    shard0 = [e for e in ledger if e["shard"] == "00000"]
    assert {(e["key"], e["code"]) for e in shard0} == {
        ("s3", "missing_caption"),
        (None, "truncated_tar"),
    }
    assert "the tar ends inside this sample" in next(e for e in shard0 if e["key"])["reason"]
    assert sorted(read_latent_shard(out / "00000.tar")) == ["s0", "s1", "s2"]
    shard1 = [e for e in ledger if e["shard"] == "00001"]
    assert [(e["key"], e["code"]) for e in shard1] == [(None, "truncated_tar")]
    assert "end-of-archive marker" in shard1[0]["reason"]
    assert sorted(read_latent_shard(out / "00001.tar")) == ["s0", "s1", "s2"]
    shard2 = [e for e in ledger if e["shard"] == "00002"]
    assert [(e["key"], e["code"]) for e in shard2] == [(None, "truncated_tar")]
    shard3 = [e for e in ledger if e["shard"] == "00003"]
    assert [(e["key"], e["code"]) for e in shard3] == [(None, "shard_failed")]
    assert "not a tar archive (0 bytes" in shard3[0]["reason"]
    assert not (out / "00003.manifest.json").exists()
    assert sf.read_json(out / "00000.manifest.json")["tar_problem"]
    index = sf.read_index(out)
    assert not index["complete"] and index["missing"] == ["00003"]
    assert index["num_samples"] == 6
    _assert_nothing_lost(out, [raw / "00000.tar", raw / "00001.tar"], read_latent_shard)


# --------------------------------------------------------------------------- reruns


def test_rerun_skips_complete_shards_and_redoes_the_rest(tmp_path, demo_cfg):
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=3, samples_per_shard=4)
    out = tmp_path / "out"
    preprocess_shards(demo_cfg, pattern, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    first_index = sf.read_index(out)

    again = preprocess_shards(demo_cfg, pattern, out)
    assert (again.shards_already_complete, again.shards_done, again.samples_written) == (3, 0, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps

    # A crash after the tar but before the manifest, and a leftover temporary file.
    (out / "00001.manifest.json").unlink()
    (out / "00001.tar.tmp-otherhost-123").write_bytes(b"half a shard")
    redo = preprocess_shards(demo_cfg, pattern, out)
    assert (redo.shards_already_complete, redo.shards_done, redo.samples_written) == (2, 1, 4)
    assert not list(out.glob("*.tmp*"))
    # Deterministic: the redone shard is byte-identical, the index the same.
    assert sf.read_index(out)["shards"] == first_index["shards"]

    # A tar cut short after its manifest was written is not taken as complete.
    with open(out / "00000.tar", "r+b") as fh:
        fh.truncate(1024)
    assert preprocess_shards(demo_cfg, pattern, out).shards_done == 1

    # Another config into the same directory would mix datasets: refused.
    with pytest.raises(FingerprintMismatch,
                       match=r"different preprocess config \(preprocess.crop 'center' -> "
                             r"'random'\)"):
        preprocess_shards(replace(demo_cfg, crop="random"), pattern, out)
    # Also when the new run's inputs are other shards: the plan records the old config.
    other = write_synthetic_shards(tmp_path / "other", num_shards=1, samples_per_shard=2)
    with pytest.raises(FingerprintMismatch, match="different preprocess config"):
        preprocess_shards(replace(demo_cfg, crop="random"), other, tmp_path / "out")
    # Runtime-only settings do not count as another config.
    assert preprocess_shards(replace(demo_cfg, batch_size=3), pattern, out).shards_done == 0


def test_unreadable_shards_fail_without_stopping_the_run_and_are_retried(tmp_path, demo_cfg):
    write_synthetic_shards(tmp_path / "raw", num_shards=2, samples_per_shard=3)
    missing = tmp_path / "raw" / "00005.tar"
    inputs = [
        str(tmp_path / "raw" / "00000.tar"),
        f"pipe:cat {tmp_path / 'raw' / '00001.tar'}",  # works through a pipe
        f"pipe:cat {tmp_path / 'elsewhere' / '00009.tar'}",  # the command fails
        str(missing),
    ]
    out = tmp_path / "out"
    summary = preprocess_shards(demo_cfg, inputs, out)
    assert summary.shards_done == 2
    assert sorted(f["shard"] for f in summary.shards_failed) == ["00005", "00009"]
    assert not (out / "00009.tar").exists() and not (out / "00005.manifest.json").exists()
    index = sf.read_index(out)
    assert not index["complete"] and sorted(index["missing"]) == ["00005", "00009"]
    failed = [e for e in _ledger(out) if e["code"] == "shard_failed"]
    assert sorted(e["shard"] for e in failed) == ["00005", "00009"]
    assert all(e["key"] is None for e in failed)
    assert "exit" in next(e for e in failed if e["shard"] == "00009")["reason"]
    assert "00005" in summary.describe() and "FAILED" in summary.describe()
    assert not list(out.glob("*.tmp*"))  # nothing half-written left behind

    # The missing shard appears; the rerun completes it and clears its failure.
    write_synthetic_shards(tmp_path / "late", num_shards=1, samples_per_shard=3)
    (tmp_path / "late" / "00000.tar").rename(missing)
    inputs = inputs[:2] + [str(missing)]
    rerun = preprocess_shards(demo_cfg, inputs, out)
    assert (rerun.shards_done, rerun.shards_already_complete) == (1, 2)
    index = sf.read_index(out)
    assert index["complete"] and index["failed"] == [] and index["num_samples"] == 9


# --------------------------------------------------------------------------- ranks


def test_ranks_split_shards_and_the_index_completes_when_all_are_done(tmp_path, demo_cfg):
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=5, samples_per_shard=2)
    out = tmp_path / "out"
    first = preprocess_shards(demo_cfg, pattern, out, rank=1, world=2)
    assert first.shards_assigned == 2 and first.shards_done == 2
    index = sf.read_index(out)
    assert not index["complete"] and index["missing"] == ["00000", "00002", "00004"]
    second = preprocess_shards(demo_cfg, pattern, out, rank=0, world=2, finalize=False)
    assert second.shards_done == 3
    assert not sf.read_index(out)["complete"]  # not rebuilt: finalize=False
    index = finalize_index(out)
    assert index["complete"] and index["num_shards"] == 5 and index["num_samples"] == 10
    assert sf.read_index(out) == index


@pytest.mark.slow
def test_vae_and_sdxl_text_encoders_with_aspect_buckets(
    tmp_path,
    demo_cfg,
    tiny_vae_path,
    tiny_clip_path,
    tiny_open_clip,
    image_bytes,
    write_tar,
    read_latent_shard,
):
    from scaletrain.data.preprocess.config import (
        ClipGConfig,
        ClipLConfig,
        ImageEncoderConfig,
        TextEncoderConfig,
    )

    cfg = replace(
        demo_cfg,
        resolution=64,
        bucket_step=16,
        crop="random",
        image_encoder=ImageEncoderConfig(kind="vae", name=str(tiny_vae_path), dtype="bf16"),
        text_encoder=TextEncoderConfig(
            preset="sdxl",
            clip_l=ClipLConfig(name=str(tiny_clip_path)),
            clip_g=ClipGConfig(name="local-dir:" + tiny_open_clip["local_dir"]),
        ),
    )
    members = []
    for key, size in (("square", (64, 64)), ("landscape", (100, 60)), ("portrait", (60, 100))):
        members += [(f"{key}.jpg", image_bytes(size=size)), (f"{key}.txt", f"a {key}".encode())]
    shard = write_tar(tmp_path / "raw" / "00000.tar", members)
    preprocess_shards(cfg, str(shard), tmp_path / "out")
    samples = read_latent_shard(tmp_path / "out" / "00000.tar")
    expect = {"square": (64, 64), "landscape": (48, 80), "portrait": (80, 48)}
    for key, (h, w) in expect.items():
        latent, text, meta = samples[key]
        assert meta["bucket"] == [h, w] and meta["target_size"] == [h, w]
        assert (
            latent["mean"].shape == (4, h // 4, w // 4) and latent["mean"].dtype == torch.bfloat16
        )
        assert bool((latent["std"] > 0).all())
        assert text["hidden_states"].shape[1] == 48 + 32 and text["pooled"].shape == (32,)
    assert samples["landscape"][2]["original_size"] == [60, 100]
    top, left = samples["landscape"][2]["crop_top_left"]
    assert top == 0 and 0 <= left <= 80 * 100 // 48 - 80 + 1
    manifest = sf.read_json(tmp_path / "out" / "00000.manifest.json")
    assert manifest["bucket_counts"] == {"48x80": 1, "64x64": 1, "80x48": 1}
    assert manifest["image_encoder"]["scaling_factor"] == 0.5
    assert manifest["image_encoder"]["shift_factor"] == pytest.approx(0.1)
    assert manifest["text_encoder"]["preset"] == "sdxl"


def test_many_buckets_with_bounded_buffers(
    tmp_path, demo_cfg, image_bytes, write_tar, read_latent_shard, monkeypatch
):
    # Five buckets at 64^2 with step 16; 7 images each, interleaved, batch 8: no buffer
    # ever fills, so the pending-sample cap (4 x batch) must flush partial batches.
    from scaletrain.data.preprocess import pipeline

    flushes = []  # (samples received so far, batch size) at each encoder call
    received = [0]
    original_flush, original_handle = pipeline._ShardRun.flush, pipeline._ShardRun.handle

    def spy_flush(self, stem, bucket):
        flushes.append((received[0], len(self.buffers[stem].get(bucket, []))))
        return original_flush(self, stem, bucket)

    def spy_handle(self, msg):
        received[0] += isinstance(msg, pipeline.Prepared)
        return original_handle(self, msg)

    monkeypatch.setattr(pipeline._ShardRun, "flush", spy_flush)
    monkeypatch.setattr(pipeline._ShardRun, "handle", spy_handle)
    cfg = replace(demo_cfg, bucket_step=16, max_aspect_ratio=4.0, min_size=16, batch_size=8)
    sizes = {
        (64, 64): (64, 64),
        (48, 80): (80, 48),
        (80, 48): (48, 80),
        (32, 128): (128, 32),
        (128, 32): (32, 128),
    }  # bucket (h, w) -> image size (w, h)
    members, expected = [], {}
    for i in range(7):
        for bucket, size in sizes.items():
            key = f"k{i}_{bucket[0]}x{bucket[1]}"
            members += [(f"{key}.jpg", image_bytes(size=size)), (f"{key}.txt", b"a shape")]
            expected[key] = list(bucket)
    shard = write_tar(tmp_path / "raw" / "00000.tar", members)
    summary = preprocess_shards(cfg, str(shard), tmp_path / "out")
    assert summary.samples_written == 35
    samples = read_latent_shard(tmp_path / "out" / "00000.tar")
    assert {k: m["bucket"] for k, (_, _, m) in samples.items()} == expected
    for _, (latent, _, meta) in samples.items():
        h, w = meta["bucket"]
        assert latent["mean"].shape == (12, h // 2, w // 2)
    # The 33rd waiting sample (cap 32) forced a partial batch before the shard ended.
    assert flushes[0] == (33, 7) and all(size < 8 for _, size in flushes)
    manifest = sf.read_json(tmp_path / "out" / "00000.manifest.json")
    assert manifest["bucket_counts"] == {f"{h}x{w}": 7 for h, w in sizes}


def test_a_shard_split_into_parts_fails_once_and_commits_once(tmp_path, demo_cfg):
    from scaletrain.data.preprocess.samples import work_units

    assert work_units([("a", "a.tar")], 3) == [("a", "a.tar", p, 3) for p in range(3)]
    assert len(work_units([("a", "a.tar"), ("b", "b.tar")], 5)) == 4  # 2 parts each
    assert work_units([("a", "a.tar"), ("b", "b.tar")], 1) == [
        ("a", "a.tar", 0, 1),
        ("b", "b.tar", 0, 1),
    ]
    write_synthetic_shards(tmp_path / "raw", num_shards=1, samples_per_shard=9)
    cfg = replace(demo_cfg, decode_workers=2)
    out = tmp_path / "out"
    bad = f"pipe:cat {tmp_path}/raw/00000.tar; exit 3 # 00001.tar"  # data, then a failure
    summary = preprocess_shards(cfg, [bad], out)
    assert summary.shards_failed == [
        {"shard": "00001", "reason": summary.shards_failed[0]["reason"]}
    ]
    assert "exit 3" in summary.shards_failed[0]["reason"]
    assert summary.samples_written == 0 and not list(out.glob("*.tar*"))
    good = preprocess_shards(cfg, str(tmp_path / "raw" / "00000.tar"), out)
    assert (good.shards_done, good.samples_written) == (1, 9)
    assert sf.read_json(out / "00000.manifest.json")["num_input_samples"] == 9
