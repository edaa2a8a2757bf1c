"""Export from real checkpoints: `scaletrain train` with 2 processes under DeepSpeed ZeRO-2
(tiny U-Net) and ZeRO-3 (tiny MMDiT), bf16, EMA, on latent shards that the real preprocessing
wrote from the synthetic dataset. Each run is trained once per module.

What ties the exports to the live training state:
* EMA and raw weights come from two different consolidations (EMA fragments vs ZeRO fp32
  master partitions). With a constant EMA decay beta, the EMA of step 2 must equal
  beta * EMA(step 1) + (1 - beta) * raw(step 2): both consolidations have to be right.
* ZeRO-2 keeps the whole bf16 module in its model-states file: the exported raw fp32 weights
  rounded to bf16 must be exactly those live module weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file

from scaletrain.cli import main as scaletrain_main
from scaletrain.models import build_model
from scaletrain.models.inputs import example_inputs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EMA_DECAY = 0.5
RUNS = {  # ZeRO stage -> model preset
    2: "tiny_unet",
    3: "tiny_mmdit",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_runs")


@pytest.fixture(scope="module")
def latents(workdir) -> Path:
    """Two shards (one per rank) of 4 synthetic images, preprocessed with the demo's encoders."""
    from scaletrain.config import load_config
    from scaletrain.data.preprocess.pipeline import preprocess_shards
    from scaletrain.data.synthetic import write_synthetic_shards

    pattern = write_synthetic_shards(workdir / "raw", num_shards=2, samples_per_shard=4)
    cfg = load_config(REPO / "configs" / "data" / "demo.yaml", [
        f"preprocess.text_encoder.tiny.cache_dir={workdir / 'cache'}", "preprocess.progress=false",
        "preprocess.decode_workers=0"])
    out = workdir / "latents"
    preprocess_shards(cfg.preprocess, pattern, out)
    return out


def _train(run_dir: Path, preset: str, stage: int, data: Path, cache: Path) -> None:
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text(
        f"base: [{REPO / 'configs' / 'models' / (preset + '.yaml')}, "
        f"{REPO / 'configs' / 'data' / 'demo.yaml'}]\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [
        sys.executable, "-m", "scaletrain.cli", "train", str(config), "--run-dir", str(run_dir),
        "--nproc", "2", f"data.path={data}", "data.batch_size=2", "data.num_workers=0",
        "data.max_text_tokens=32", f"preprocess.text_encoder.tiny.cache_dir={cache}",
        f"train.zero_stage={stage}", "train.bf16=true", "train.max_steps=2", "train.lr=1e-2",
        "train.progress_bar=false", "ema.enabled=true", "ema.schedule=constant",
        f"ema.decay={EMA_DECAY}", "checkpoint.every=1", "checkpoint.keep_last=5",
        "logging.every=1", "logging.wandb_mode=disabled",
    ]
    if preset == "tiny_mmdit":
        cmd.append("diffusion.objective=flow")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(workdir, latents) -> dict[int, Path]:
    out = {}
    for stage, preset in RUNS.items():
        run_dir = workdir / f"zero{stage}"
        _train(run_dir, preset, stage, latents, workdir / "cache")
        out[stage] = run_dir
    return out


def export(run_dir, out, *extra) -> Path:
    code = scaletrain_main(["export", str(run_dir), "--out", str(out), "--log-level", "WARNING",
                            *extra])
    assert code == 0
    return Path(out)


def weights(export_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export_dir / "model.safetensors"))


@pytest.mark.parametrize("stage", list(RUNS))
def test_ema_and_raw_consolidations_agree_through_the_ema_recursion(runs, stage, tmp_path):
    run = runs[stage]
    ema1 = weights(export(run, tmp_path / "ema1", "--step", "1", "--weights", "ema"))
    ema2 = weights(export(run, tmp_path / "ema2", "--weights", "ema"))  # newest: step 2
    raw2 = weights(export(run, tmp_path / "raw2", "--step", "2", "--weights", "raw"))
    model = build_model(_model_config(tmp_path / "raw2"), device="meta")
    assert ema2.keys() == raw2.keys() == model.state_dict().keys()
    moved = max((raw2[k] - ema1[k]).abs().max().item() for k in raw2)
    assert moved > 1e-3  # training moved the weights: the identity below is not trivial
    for key in raw2:
        expected = EMA_DECAY * ema1[key] + (1 - EMA_DECAY) * raw2[key]
        torch.testing.assert_close(ema2[key], expected, atol=1e-6, rtol=1e-6, msg=key)


def test_zero2_raw_export_is_the_live_bf16_module(runs, tmp_path):
    raw = weights(export(runs[2], tmp_path / "raw", "--weights", "raw"))
    ckpt = runs[2] / "checkpoints" / "step_000000002" / "ds"
    live = torch.load(next(ckpt.glob("mp_rank_00_model_states.pt")), map_location="cpu",
                      weights_only=False)["module"]
    live = {k.removeprefix("module."): v for k, v in live.items()}
    assert live.keys() == raw.keys()
    for key, value in live.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(raw[key].to(torch.bfloat16), value), key


def test_provenance_steps_and_incomplete_checkpoints(runs, tmp_path, capsys):
    run = runs[3]
    meta = json.loads((export(run, tmp_path / "a", "--step", "1") / "config.json").read_text())
    prov = meta["provenance"]
    assert (prov["step"], prov["weights"], prov["world_size"], prov["zero_stage"]) == (1, "ema", 2, 3)
    assert meta["model"]["arch"] == "mmdit" and meta["diffusion"]["objective"] == "flow"
    assert meta["dataset_encoders"]["text_encoder"]["preset"] == "tiny_clip"
    assert meta["warnings"] == []
    # A step directory itself is accepted; a checkpoint without its marker never is.
    step2 = run / "checkpoints" / "step_000000002"
    assert json.loads((export(step2, tmp_path / "b") / "config.json").read_text()
                      )["provenance"]["step"] == 2
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "step_000000002" / "COMPLETE").unlink()
    meta = json.loads((export(copy, tmp_path / "c") / "config.json").read_text())
    assert meta["provenance"]["step"] == 1
    # A checkpoint without EMA shards: the EMA export says so and points at the raw weights.
    shutil.rmtree(copy / "checkpoints" / "step_000000001" / "ema")
    assert scaletrain_main(["export", str(copy), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "has no EMA" in err and "--weights raw" in err
    export(copy, tmp_path / "e", "--weights", "raw")
    assert scaletrain_main(["export", str(run), "--step", "7", "--out", str(tmp_path / "d")]) == 1
    assert "no complete checkpoint for step 7" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("stage", list(RUNS))
def test_trained_checkpoint_in_diffusers_layout_matches_ours(runs, stage, tmp_path):
    ours_dir = export(runs[stage], tmp_path / "ours", "--weights", "ema")
    theirs_dir = export(runs[stage], tmp_path / "theirs", "--weights", "ema",
                        "--format", "diffusers")
    cfg = _model_config(ours_dir)
    ours = build_model(cfg).eval()
    ours.load_state_dict(weights(ours_dir))
    cls = UNet2DConditionModel if cfg.arch == "unet" else SD3Transformer2DModel
    theirs, info = cls.from_pretrained(str(theirs_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = example_inputs(cfg, batch_size=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(**inputs) - theirs.eval()(**inputs).sample).abs().max().item()
    assert diff <= 1e-5


def test_bf16_export_of_a_checkpoint_and_sampling_from_it(runs, workdir, tmp_path):
    from scaletrain.sample.pipeline import sample_images

    fp32 = weights(export(runs[2], tmp_path / "fp32"))
    bf16_dir = export(runs[2], tmp_path / "bf16", "--dtype", "bf16")
    bf16 = weights(bf16_dir)
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], v.to(torch.bfloat16))
               for k, v in fp32.items())
    records = sample_images(bf16_dir, ["a red circle", "a blue square"], steps=2, cfg_scale=3.0,
                            seed=0, out_dir=tmp_path / "samples")
    assert len(records) == 2 and all((tmp_path / "samples" / r["file"]).is_file() for r in records)
    assert (tmp_path / "samples" / "grid.png").is_file()


def _model_config(export_dir: Path):
    from scaletrain.export.layout import read_metadata
    from scaletrain.export.reader import model_config_from_dict

    return model_config_from_dict(read_metadata(export_dir)["model"])


def test_sampling_conditions_on_what_training_read_from_the_shards(runs, latents):
    """The sampler's prompt encoding, rebuilt from the export's record of the encoders, is
    the text the preprocessing stored and the loader padded: same layout and padding, same
    values up to float rounding. Not bit for bit: preprocessing encodes captions in batches
    for throughput, the sampler one prompt at a time (so that an image never depends on the
    prompts beside it), and a batched GEMM may round a row differently (CPU BLAS picks its
    kernel by batch size). A wrong token, padding or encoder is off by O(1), not 1e-6."""
    import tarfile

    from safetensors.torch import load

    from scaletrain.data.loader.batching import text_context
    from scaletrain.export.reader import load_export
    from scaletrain.sample.conditioning import PromptConditioner

    loaded = load_export(_export_once(runs[2]))
    conditioner = PromptConditioner(loaded.preprocess, loaded.max_text_tokens, loaded.arch,
                                    loaded.diffusion.cfg_null)
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(latents / "00000.tar") as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    captions = [json.loads(s["json"])["caption"] for s in samples.values()]
    stored = [text_context(load(s["text.safetensors"]), loaded.max_text_tokens)
              for s in samples.values()]
    cond = conditioner.cond(captions, 64, 64)
    for i, ref in enumerate(stored):
        for key in ("encoder_hidden_states", "pooled"):
            assert cond[key][i].shape == ref[key].shape, (captions[i], key)
            torch.testing.assert_close(cond[key][i], ref[key], rtol=1e-5, atol=1e-6,
                                       msg=f"{captions[i]!r}, {key}")
    metas = [json.loads(s["json"]) for s in samples.values()]
    assert cond["time_ids"].tolist() == [
        [*m["original_size"], *m["crop_top_left"], *m["target_size"]] for m in metas]


_EXPORTS: dict[Path, Path] = {}


def _export_once(run_dir: Path) -> Path:
    if run_dir not in _EXPORTS:
        _EXPORTS[run_dir] = export(run_dir, run_dir.parent / f"{run_dir.name}_export")
    return _EXPORTS[run_dir]
