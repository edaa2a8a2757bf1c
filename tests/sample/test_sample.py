"""sample_images and `scaletrain sample` on tiny exports with the demo's real encoders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from scaletrain.cli import main as scaletrain_main
from scaletrain.core.config_base import ConfigError
from scaletrain.sample.conditioning import PromptConditioner
from scaletrain.sample.pipeline import read_prompts, sample_images
from tests.support.tiny import tiny_root_config

from .conftest import write_export  # noqa: TID252


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_writes_one_png_per_prompt_and_seed_records_and_grid(unet_export, tmp_path):
    prompts = ["a red circle", "a blue square"]
    records = sample_images(unet_export, prompts, steps=3, cfg_scale=4.0, seed=[5, 6],
                            out_dir=tmp_path)
    assert [(r["prompt"], r["seed"]) for r in records] == [
        ("a red circle", 5), ("a red circle", 6), ("a blue square", 5), ("a blue square", 6)]
    assert records[0]["file"] == "0000_a-red-circle_seed5.png"
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    for r in records:
        with Image.open(tmp_path / r["file"]) as img:
            assert img.size == (64, 64) and img.mode == "RGB"  # 32x32 latents, pixel factor 2
    with Image.open(tmp_path / "grid.png") as grid:  # a row per prompt, a column per seed
        assert grid.size == (2 + 2 * 66, 2 + 2 * 66)
    settings = json.loads((tmp_path / "sample_settings.json").read_text())
    assert (settings["steps"], settings["cfg_scale"], settings["sampler"]) == (3, 4.0, "DDIMSampler")


def test_same_seed_same_images_and_prompt_and_seed_change_them(unet_export, tmp_path):
    run = dict(steps=3, cfg_scale=4.0)
    a = sample_images(unet_export, ["a red circle", "a blue square"], seed=[0, 1],
                      out_dir=tmp_path / "a", **run)
    b = sample_images(unet_export, ["a red circle"], seed=[0], out_dir=tmp_path / "b",
                      batch_size=1, **run)
    red0, red1, blue0 = (pixels(tmp_path / "a" / a[i]["file"]) for i in (0, 1, 2))
    # Determinism, independent of the batch an image was in (up to a rounding step).
    assert np.abs(pixels(tmp_path / "b" / b[0]["file"]) - red0).max() <= 1
    # The prompt changes the image, and so does the seed.
    assert np.abs(red0 - blue0).mean() > 2.0
    assert np.abs(red0 - red1).mean() > 2.0


def test_guidance_and_negative_prompt_change_the_image(mmdit_export, tmp_path):
    common = dict(prompts=["a green star"], steps=3, seed=3)
    plain = sample_images(mmdit_export, cfg_scale=1.0, out_dir=tmp_path / "p", **common)
    guided = sample_images(mmdit_export, cfg_scale=6.0, out_dir=tmp_path / "g", **common)
    negative = sample_images(mmdit_export, cfg_scale=6.0, negative_prompt="a red circle",
                             out_dir=tmp_path / "n", **common)
    p, g, n = (pixels(d / r[0]["file"]) for d, r in
               ((tmp_path / "p", plain), (tmp_path / "g", guided), (tmp_path / "n", negative)))
    assert np.abs(p - g).mean() > 2.0 and np.abs(g - n).mean() > 2.0


def test_diffusers_layout_samples_the_same_images(tiny_clip_cache, tmp_path):
    ours = write_export(tmp_path / "ours", "tiny_unet", tiny_clip_cache)
    theirs = write_export(tmp_path / "theirs", "tiny_unet", tiny_clip_cache, layout="diffusers")
    args = dict(prompts=["a yellow diamond"], steps=3, cfg_scale=3.0, seed=0)
    a = sample_images(ours, out_dir=tmp_path / "a", **args)
    b = sample_images(theirs, out_dir=tmp_path / "b", **args)
    assert np.abs(pixels(tmp_path / "a" / a[0]["file"]) - pixels(tmp_path / "b" / b[0]["file"])
                  ).max() <= 1


def test_conditioning_uses_the_training_layout_and_null(tiny_clip_cache):
    cfg = tiny_root_config("tiny_unet", cache_dir=tiny_clip_cache)
    zeros = PromptConditioner(cfg.preprocess, 32, "unet", "zeros")
    cond = zeros.cond(["a red circle", "a blue square"], 64, 96)
    assert cond["encoder_hidden_states"].shape == (2, 32, 64)
    assert cond["pooled"].shape == (2, 64)
    assert cond["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * 2
    # "a red circle": BOS + 3 word tokens + EOS are real; the rest is zero padding.
    assert cond["encoder_hidden_states"][0, :5].abs().sum(-1).gt(0).all()
    assert cond["encoder_hidden_states"][0, 5:].abs().sum() == 0
    assert not torch.equal(cond["pooled"][0], cond["pooled"][1])
    un = zeros.uncond(cond)
    assert un["encoder_hidden_states"].abs().sum() == 0 and un["pooled"].abs().sum() == 0
    assert torch.equal(un["time_ids"], cond["time_ids"])

    empty = PromptConditioner(cfg.preprocess, 32, "unet", "empty_prompt").uncond(cond)
    reference = zeros.text([""])
    assert torch.equal(empty["pooled"][1], reference["pooled"][0])
    assert torch.equal(empty["encoder_hidden_states"][0], reference["encoder_hidden_states"][0])


def test_a_prompt_encodes_the_same_whatever_is_encoded_beside_it(tiny_clip_cache):
    """Validation encodes all of its prompts in one go, `scaletrain sample` its own list: a
    prompt's conditioning must not depend on its neighbours (a batched GEMM may round a row
    differently; seen as a 1-level pixel difference between the two paths on CI's CPU)."""
    cfg = tiny_root_config("tiny_unet", cache_dir=tiny_clip_cache)
    prompts = ["a red circle", "a blue square", "three green triangles on a line", ""]
    together = PromptConditioner(cfg.preprocess, 32, "unet", "zeros").text(prompts)
    for i, prompt in enumerate(prompts):
        alone = PromptConditioner(cfg.preprocess, 32, "unet", "zeros").text([prompt])
        for key in ("encoder_hidden_states", "pooled"):
            assert torch.equal(together[key][i], alone[key][0]), (prompt, key)


def test_encoders_that_do_not_fit_the_model_are_named(unet_export, tiny_clip_cache, tmp_path):
    export = write_export(tmp_path / "e", "tiny_unet", tiny_clip_cache,
                          ["model.cross_attention_dim=48"])
    with pytest.raises(ValueError, match="model.cross_attention_dim is 48"):
        sample_images(export, ["a red circle"], steps=1, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="--height 63 is not a multiple"):
        sample_images(unet_export, ["x"], steps=1, height=63, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="--width 68: the latent side 34 must be a multiple of 4"):
        sample_images(unet_export, ["x"], steps=1, width=68, out_dir=tmp_path / "o")


def test_cli_reads_a_prompts_file_and_reports_errors(unet_export, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# demo prompts\na red circle\n\na purple triangle\n")
    assert read_prompts(prompts) == ["a red circle", "a purple triangle"]
    out = tmp_path / "out"
    code = scaletrain_main(["sample", "--weights", str(unet_export), "--prompts", str(prompts),
                            "--steps", "2", "--cfg", "2.5", "--seed", "1", "2", "--out", str(out),
                            "--sampler", "euler", "--device", "cpu", "--log-level", "WARNING"])
    assert code == 0
    records = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all((out / r["file"]).is_file() for r in records)
    assert (out / "grid.png").is_file()
    assert json.loads((out / "sample_settings.json").read_text())["sampler"] == "EulerSampler"

    code = scaletrain_main(["sample", "--weights", str(tmp_path / "nowhere"), "--prompt", "x",
                            "--out", str(tmp_path / "o2")])
    assert code == 1
    assert "no such export directory" in capsys.readouterr().err


def test_bf16_sampling_stays_close_to_fp32(unet_export, tmp_path):
    args = dict(prompts=["a cyan circle"], steps=2, cfg_scale=2.0, seed=4)
    a = sample_images(unet_export, out_dir=tmp_path / "a", **args)
    b = sample_images(unet_export, out_dir=tmp_path / "b", dtype=torch.bfloat16, **args)
    diff = np.abs(pixels(tmp_path / "a" / a[0]["file"]) - pixels(tmp_path / "b" / b[0]["file"]))
    assert diff.mean() < 3.0  # bf16 rounding (about 1 level); another seed differs by ~100


def test_a_vae_export_decodes_through_the_recorded_vae(tiny_clip_cache, tmp_path):
    from scaletrain.data.encoders.tiny import save_tiny_vae

    vae = save_tiny_vae(tmp_path / "vae", latent_channels=4, block_out_channels=(8, 16),
                        scaling_factor=0.5)
    export = write_export(tmp_path / "e", "tiny_unet", tiny_clip_cache, [
        "model.in_channels=4", "model.out_channels=4", "model.sample_size=16",
        "preprocess.image_encoder.kind=vae", f"preprocess.image_encoder.name={vae}",
        "preprocess.image_encoder.dtype=fp32"])
    records = sample_images(export, ["a black star"], steps=2, cfg_scale=2.0, seed=0,
                            out_dir=tmp_path / "o")
    with Image.open(tmp_path / "o" / records[0]["file"]) as img:
        assert img.size == (32, 32)  # 16x16 latents, the tiny VAE upsamples by 2
    # Without the VAE on disk the error names it.
    shutil.rmtree(vae)
    with pytest.raises(ConfigError, match=f"VAE: {vae}: no such file or directory"):
        sample_images(export, ["a black star"], steps=1, out_dir=tmp_path / "o2")


def test_cli_refuses_an_out_folder_with_earlier_samples(unet_export, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["sample", "--weights", str(unet_export), "--prompt", "a red circle", "--steps", "2",
            "--seed", "0", "1", "--out", str(out), "--device", "cpu", "--log-level", "WARNING"]
    assert scaletrain_main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = [*argv[:4], "a blue square", *argv[5:8], "3", *argv[9:]]  # other prompt and seed
    assert scaletrain_main(again) == 1
    assert "already holds files" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
