"""`scaletrain preprocess` through the real dispatcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.cli import main
from scaletrain.data import shard_format as sf
from scaletrain.data.synthetic import write_synthetic_shards

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "data" / "demo.yaml")


def _overrides(cache) -> list[str]:
    return [f"preprocess.text_encoder.tiny.cache_dir={cache}", "preprocess.progress=false"]


def test_preprocess_command_writes_an_index_and_reports(tmp_path, tiny_cache, capsys):
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=2, samples_per_shard=3)
    out = tmp_path / "out"
    argv = ["preprocess", DEMO, "--input", pattern, "--output", str(out), *_overrides(tiny_cache)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 written" in printed and "6 written" in printed and "(complete)" in printed
    index = sf.read_index(out)
    assert index["num_samples"] == 6
    # Storage sizing: bytes per sample of each member, from the manifests' byte counts.
    text = index["member_bytes"]["text.safetensors"]
    assert f"text.safetensors {text / 6 / 1000:.1f} KB" in printed
    assert "100M samples:" in printed
    # A second run finds everything complete; --finalize-only rebuilds the index alone.
    assert main(argv) == 0
    assert "2 already complete" in capsys.readouterr().out
    (out / sf.INDEX_NAME).unlink()
    assert main(["preprocess", DEMO, "--output", str(out), "--finalize-only"]) == 0
    assert sf.read_index(out)["complete"]


def test_failed_shard_gives_exit_status_1(tmp_path, tiny_cache, capsys):
    write_synthetic_shards(tmp_path / "raw", num_shards=1, samples_per_shard=2)
    pattern = f"{tmp_path}/raw/{{00000..00001}}.tar"  # 00001 does not exist
    argv = [
        "preprocess",
        DEMO,
        "--input",
        pattern,
        "--output",
        str(tmp_path / "out"),
        *_overrides(tiny_cache),
    ]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "FAILED 00001" in printed and "1 missing" in printed


def test_usage_errors_and_dry_run(tmp_path, capsys):
    assert main(["preprocess", DEMO, "--output", str(tmp_path)]) == 2  # no --input
    assert (
        main(
            [
                "preprocess",
                DEMO,
                "--input",
                "x.tar",
                "--output",
                str(tmp_path),
                "preprocess.min_size=0",
            ]
        )
        == 2
    )
    assert "preprocess.min_size" in capsys.readouterr().err
    assert main(["preprocess", DEMO, "--input", "x.tar"]) == 2  # no --output
    assert "--output DIR is required" in capsys.readouterr().err
    assert main(["preprocess", DEMO, "--dry-run"]) == 0
    assert "preset: tiny_clip" in capsys.readouterr().out


@pytest.mark.slow
def test_local_workers_split_the_shards(tmp_path, tiny_cache, capsys):
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=3, samples_per_shard=2)
    out = tmp_path / "out"
    argv = [
        "preprocess",
        DEMO,
        "--input",
        pattern,
        "--output",
        str(out),
        "--workers",
        "2",
        *_overrides(tiny_cache),
        "preprocess.decode_workers=0",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "shards: 3 written" in printed and "assigned to 2 ranks" in printed
    index = sf.read_index(out)
    assert index["complete"] and index["num_samples"] == 6 and index["num_shards"] == 3


@pytest.mark.parametrize("where", ["raw", "raw/latents", "."])
def test_output_overlapping_the_inputs_folder_is_refused_before_reading(
        tmp_path, tiny_cache, capsys, where):
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=2, samples_per_shard=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()}
    out = (tmp_path / where).resolve()
    argv = ["preprocess", DEMO, "--input", pattern, "--output", str(out),
            *_overrides(tiny_cache)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "apart from the inputs" in err
    # Nothing written: the raw shards are untouched, no index, no latents folder.
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == before
    assert not (tmp_path / "raw" / "latents").exists()
    assert not (tmp_path / sf.INDEX_NAME).exists()


def test_output_made_with_another_config_is_refused_naming_the_keys(tmp_path, tiny_cache,
                                                                     capsys):
    """Adding shards of another encoder or resolution to an output would mix two datasets
    (issue 15): one line naming the differing keys, before an input is listed or anything in
    the output is touched; the same config again is a resume and passes."""
    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=2, samples_per_shard=2)
    out = tmp_path / "out"
    argv = ["preprocess", DEMO, "--input", pattern, "--output", str(out),
            *_overrides(tiny_cache)]
    assert main(argv) == 0
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # Other inputs that do not exist: refused before they are looked at.
    other = ["preprocess", DEMO, "--input", str(tmp_path / "nowhere" / "{0..3}.tar"),
             "--output", str(out), *_overrides(tiny_cache)]
    assert main([*other, "preprocess.resolution=128", "preprocess.image_encoder.factor=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert f"{out} holds shards made with a different preprocess config" in err
    assert "preprocess.image_encoder.factor 2 -> 4" in err
    assert "preprocess.resolution 64 -> 128" in err
    assert "fresh --output" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # Runtime keys are not another config; the same config resumes (nothing left to do).
    assert main([*argv, "preprocess.batch_size=3"]) == 0
    assert "2 already complete" in capsys.readouterr().out


@pytest.mark.slow  # the hub client retries for ~40 s before it gives up
def test_a_hub_id_without_network_is_one_line_without_the_clients_retries(tmp_path):
    """With no network (and HF_HUB_OFFLINE unset: a user who did not know to set it) the hub
    client used to log ~20 lines of "Retrying in Ns" and its own warnings before our error
    (issue 15). A real process: the hub libraries read their settings at import."""
    import os
    import subprocess
    import sys

    pattern = write_synthetic_shards(tmp_path / "raw", num_shards=1, samples_per_shard=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(
        ("HF_", "TRANSFORMERS_", "DIFFUSERS_", "SCALETRAIN_SHOW"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"),  # refused
               PYTHONPATH=str(Path(DEMO).parents[2]))
    proc = subprocess.run(
        [sys.executable, "-m", "scaletrain.cli", "preprocess", DEMO, "--input", pattern,
         "--output", str(tmp_path / "out"), "preprocess.image_encoder.kind=vae",
         "preprocess.image_encoder.name=some-org/some-vae"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("scaletrain preprocess: config error: VAE: model "
                                "'some-org/some-vae' is not available offline"), proc.stderr
    assert len(lines) <= 3, proc.stderr  # two INFO lines of ours, then the error
    assert "Retrying" not in proc.stderr and "huggingface_hub" not in proc.stderr
