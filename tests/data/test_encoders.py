"""Encoders built from tiny models saved on disk, loaded by the code that loads real ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scaletrain.data.encoders import build_image_encoder, build_text_encoder, unbatch_text
from scaletrain.data.preprocess.config import (
    ClipGConfig,
    ClipLConfig,
    ImageEncoderConfig,
    PreprocessConfig,
    T5Config,
    TextEncoderConfig,
    TinyTextConfig,
)

CAPTIONS = ["a red circle", "", "a blue square on a green background"]


# --------------------------------------------------------------------------- pixel


def test_pixel_encoder_is_exact_space_to_depth_and_inverts():
    enc = build_image_encoder(ImageEncoderConfig(kind="pixel", factor=2, dtype="fp32"))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = enc.encode(x)
    assert out["mean"].shape == (2, 12, 32, 32) and out["mean"].dtype == torch.float32
    assert torch.equal(out["std"], torch.zeros_like(out["mean"]))
    # Channel c*4 + i*2 + j of cell (y, x) is pixel (2y+i, 2x+j) of colour c.
    assert out["mean"][1, 1 * 4 + 0 * 2 + 1, 5, 7] == x[1, 1, 2 * 5 + 0, 2 * 7 + 1]
    assert torch.equal(enc.decode(out["mean"]), x)
    assert (enc.scaling_factor, enc.shift_factor, enc.latent_channels) == (1.0, 0.0, 12)


def test_pixel_encoder_in_fp16_recovers_every_8bit_value():
    enc = build_image_encoder(ImageEncoderConfig(kind="pixel", factor=4, dtype="fp16"))
    pixels = torch.arange(256, dtype=torch.float32).repeat(3, 16, 1).reshape(1, 3, 64, 64)
    pixels = pixels[:, :, :64, :64]
    latents = enc.encode(pixels / 127.5 - 1)
    assert latents["mean"].shape == (1, 48, 16, 16) and latents["mean"].dtype == torch.float16
    back = ((enc.decode(latents["mean"]) + 1) * 127.5).round()
    assert torch.equal(back, pixels)


def test_pixel_encoder_rejects_bad_shapes():
    enc = build_image_encoder(ImageEncoderConfig(kind="pixel", factor=2))
    with pytest.raises(ValueError, match="multiple"):
        enc.encode(torch.zeros(1, 3, 63, 64))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        enc.encode(torch.zeros(3, 64, 64))


# --------------------------------------------------------------------------- VAE


def test_vae_from_local_dir_stores_distribution_and_factors(tiny_vae_path):
    from diffusers import AutoencoderKL

    enc = build_image_encoder(ImageEncoderConfig(kind="vae", name=str(tiny_vae_path)), "cpu")
    assert (enc.latent_channels, enc.downsample) == (4, 4)
    assert (enc.scaling_factor, enc.shift_factor) == (0.5, pytest.approx(0.1))
    x = torch.rand(2, 3, 64, 32) * 2 - 1
    out = enc.encode(x)
    assert out["mean"].shape == out["std"].shape == (2, 4, 16, 8)
    assert out["mean"].dtype == torch.bfloat16 and bool((out["std"] > 0).all())
    ref = AutoencoderKL.from_pretrained(tiny_vae_path).encode(x).latent_dist
    assert torch.allclose(out["mean"].float(), ref.mean, atol=2e-2, rtol=1e-2)
    assert torch.allclose(out["std"].float(), ref.std, atol=2e-2, rtol=1e-2)
    z = torch.randn(1, 4, 8, 8)
    assert torch.allclose(enc.unscale(enc.scale(z)), z, atol=1e-6)
    assert enc.decode(z).shape == (1, 3, 32, 32)
    ident = enc.identity()
    assert ident["kind"] == "vae" and ident["name"] == str(tiny_vae_path)
    assert ident["scaling_factor"] == 0.5 and ident["dtype"] == "bf16"


def test_vae_factor_overrides(tiny_vae_path):
    cfg = ImageEncoderConfig(
        kind="vae", name=str(tiny_vae_path), scaling_factor=0.13, shift_factor=0.0, dtype="fp16"
    )
    enc = build_image_encoder(cfg, "cpu")
    assert (enc.scaling_factor, enc.shift_factor) == (0.13, 0.0)
    assert enc.encode(torch.zeros(1, 3, 32, 32))["mean"].dtype == torch.float16


def test_unreachable_hub_id_fails_with_its_name(tmp_path):
    # Tests run with HF_HUB_OFFLINE=1: the real loading path must fail loudly, not hang.
    from scaletrain.core.config_base import ConfigError

    with pytest.raises(ConfigError, match="stabilityai/sdxl-vae"):
        build_image_encoder(ImageEncoderConfig(kind="vae", name="stabilityai/sdxl-vae"), "cpu")
    with pytest.raises(ConfigError, match="not-there: no such file or directory"):
        build_image_encoder(ImageEncoderConfig(kind="vae", name=str(tmp_path / "not-there")))


# --------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def sd3_encoder(tiny_clip_path, tiny_open_clip, tiny_t5_path):
    cfg = TextEncoderConfig(
        preset="sd3",
        clip_l=ClipLConfig(name=str(tiny_clip_path)),
        clip_g=ClipGConfig(
            name="tiny-openclip",
            pretrained=tiny_open_clip["pretrained"],
            model_config=tiny_open_clip["model_config"],
        ),
        t5=T5Config(name=str(tiny_t5_path), max_length=16),
        dtype="fp32",
    )
    return build_text_encoder(cfg, "cpu")


def test_sdxl_preset_penultimate_states_and_pooled_bigg(tiny_clip_path, tiny_open_clip):
    import open_clip
    from transformers import CLIPTextModel, CLIPTokenizer

    cfg = TextEncoderConfig(
        preset="sdxl",
        clip_l=ClipLConfig(name=str(tiny_clip_path)),
        clip_g=ClipGConfig(name="local-dir:" + tiny_open_clip["local_dir"]),
        dtype="fp32",
    )
    enc = build_text_encoder(cfg, "cpu")
    out = enc.encode(CAPTIONS)
    assert set(out) == {"hidden_states", "lengths", "pooled"}
    assert out["hidden_states"].shape[2] == 48 + 32 == enc.hidden_dim
    assert out["pooled"].shape == (3, 32) == (3, enc.pooled_dim)
    tok = CLIPTokenizer.from_pretrained(tiny_clip_path)
    real = [len(tok(c).input_ids) for c in CAPTIONS]
    assert out["lengths"].tolist() == real and real[1] == 2  # "" is BOS + EOS
    assert out["hidden_states"].shape[1] == max(real)
    # CLIP-L part = hidden_states[-2] of the model itself (the penultimate layer).
    model = CLIPTextModel.from_pretrained(tiny_clip_path)
    ids = tok(CAPTIONS[0], return_tensors="pt").input_ids
    ref = model(ids, output_hidden_states=True).hidden_states[-2][0]
    assert torch.allclose(out["hidden_states"][0, : real[0], :48], ref, atol=1e-5)
    # bigG part: pooled = open_clip's own (unnormalised) encode_text.
    oc = open_clip.create_model("local-dir:" + tiny_open_clip["local_dir"])
    oc_tok = open_clip.get_tokenizer("local-dir:" + tiny_open_clip["local_dir"])
    ids = oc_tok(CAPTIONS)
    assert torch.allclose(out["pooled"], oc.encode_text(ids), atol=1e-5)
    # bigG states = the output of the second-to-last residual block, computed by hand.
    x = oc.token_embedding(ids) + oc.positional_embedding
    for block in oc.transformer.resblocks[:-1]:
        x = block(x, attn_mask=oc.attn_mask)
    assert torch.allclose(out["hidden_states"][0, : real[0], 48:], x[0, : real[0]], atol=1e-5)
    # Positions past a caption's length are zero.
    assert out["hidden_states"][1, 2:].abs().sum() == 0
    per = unbatch_text(out)
    assert [p["hidden_states"].shape for p in per] == [(n, 80) for n in real]
    assert per[0]["pooled"].shape == (32,)


def test_open_clip_checkpoint_and_local_dir_load_the_same_weights(tiny_clip_path, tiny_open_clip):
    outs = []
    for clip_g in (
        ClipGConfig(
            name="tiny-openclip",
            pretrained=tiny_open_clip["pretrained"],
            model_config=tiny_open_clip["model_config"],
        ),
        ClipGConfig(name="local-dir:" + tiny_open_clip["local_dir"]),
    ):
        cfg = TextEncoderConfig(
            preset="sdxl", clip_l=ClipLConfig(name=str(tiny_clip_path)), clip_g=clip_g, dtype="fp32"
        )
        outs.append(build_text_encoder(cfg, "cpu").encode(["a red circle"]))
    assert torch.equal(outs[0]["pooled"], outs[1]["pooled"])
    assert torch.equal(outs[0]["hidden_states"], outs[1]["hidden_states"])


def test_sd3_preset_keys_shapes_and_t5_lengths(sd3_encoder, tiny_t5_path):
    from transformers import AutoTokenizer

    out = sd3_encoder.encode(CAPTIONS)
    assert set(out) == {"hidden_states", "lengths", "pooled", "t5_hidden_states", "t5_lengths"}
    assert out["pooled"].shape == (3, 24 + 32)  # pooled CLIP-L (projected) + bigG
    assert out["hidden_states"].shape[2] == 80
    tok = AutoTokenizer.from_pretrained(tiny_t5_path)
    t5_real = [len(tok(c).input_ids) for c in CAPTIONS]
    assert out["t5_lengths"].tolist() == t5_real and t5_real[1] == 1  # "" is just </s>
    assert out["t5_hidden_states"].shape == (3, max(t5_real), 32)
    per = unbatch_text(out)
    assert [p["t5_hidden_states"].shape[0] for p in per] == t5_real


def test_states_of_a_caption_do_not_depend_on_its_batch(sd3_encoder):
    # T5 is bidirectional: without the attention mask, padding would change the states.
    alone = unbatch_text(sd3_encoder.encode([CAPTIONS[0]]))[0]
    batched = unbatch_text(sd3_encoder.encode(CAPTIONS))[0]
    for key in alone:
        assert alone[key].shape == batched[key].shape
        assert torch.allclose(alone[key], batched[key], atol=1e-5), key


def test_untrimmed_clip_states_keep_max_length(tiny_clip_path, tiny_open_clip):
    cfg = TextEncoderConfig(
        preset="sdxl",
        clip_l=ClipLConfig(name=str(tiny_clip_path), max_length=77),
        clip_g=ClipGConfig(name="local-dir:" + tiny_open_clip["local_dir"]),
        trim_clip=False,
    )
    out = build_text_encoder(cfg, "cpu").encode(["a red circle"])
    # Every position of the longer context (open_clip's 77; the tiny CLIP-L has 32, zero-padded).
    assert out["hidden_states"].shape[1] == 77 and out["lengths"].tolist() == [77]
    assert out["hidden_states"][0, 32:, :48].abs().sum() == 0
    assert out["hidden_states"][0, 5:32].abs().sum() > 0  # padding positions are kept
    assert out["hidden_states"].dtype == torch.bfloat16


def test_tiny_clip_is_built_once_deterministically_and_depends_on_caption(tmp_path):
    from scaletrain.data.encoders.tiny import ensure_tiny_clip

    cfg = TextEncoderConfig(
        preset="tiny_clip", tiny=TinyTextConfig(cache_dir=str(tmp_path / "a")), dtype="fp32"
    )
    enc = build_text_encoder(
        PreprocessConfig(
            text_encoder=cfg, device="cpu", image_encoder=ImageEncoderConfig(kind="pixel")
        )
    )
    path = ensure_tiny_clip(cfg.tiny)
    assert path.parent == tmp_path / "a" and (path / "config.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_clip(cfg.tiny) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = ensure_tiny_clip(TinyTextConfig(cache_dir=str(tmp_path / "b")))
    assert (other / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
    out = enc.encode(["a red circle", "a blue square", "a red circle"])
    assert out["hidden_states"].shape[2] == 64 and out["pooled"].shape == (3, 64)
    assert torch.equal(out["pooled"][0], out["pooled"][2])
    assert not torch.allclose(out["pooled"][0], out["pooled"][1], atol=1e-3)
    # Every demo caption word is a single token (plus BOS and EOS).
    assert out["lengths"].tolist() == [5, 5, 5]
    assert np.isfinite(out["hidden_states"].numpy()).all()


def test_diffusers_style_repo_layout_with_subfolders(tmp_path, tiny_clip_path, tiny_vae_path):
    """A pipeline repo keeps each model in a subfolder (vae/, text_encoder_2/, tokenizer_2/);
    bigG can also come from transformers (CLIPTextModelWithProjection) instead of open_clip."""
    import shutil

    repo = tmp_path / "pipeline"
    shutil.copytree(tiny_vae_path, repo / "vae")
    shutil.copytree(tiny_clip_path, repo / "text_encoder_2")
    shutil.copytree(tiny_clip_path, repo / "tokenizer_2")
    vae = build_image_encoder(
        ImageEncoderConfig(kind="vae", name=str(repo), subfolder="vae"), "cpu"
    )
    assert vae.encode(torch.zeros(1, 3, 32, 32))["mean"].shape == (1, 4, 8, 8)
    cfg = TextEncoderConfig(
        preset="sdxl",
        clip_l=ClipLConfig(name=str(tiny_clip_path)),
        clip_g=ClipGConfig(
            library="transformers",
            name=str(repo),
            subfolder="text_encoder_2",
            tokenizer_subfolder="tokenizer_2",
        ),
        dtype="fp32",
    )
    enc = build_text_encoder(cfg, "cpu")
    out = enc.encode(["a red circle"])
    assert out["hidden_states"].shape == (1, 5, 96) and out["pooled"].shape == (1, 24)
    # Same weights in both slots: the two halves of the states are equal.
    assert torch.equal(out["hidden_states"][..., :48], out["hidden_states"][..., 48:])
    with pytest.raises(OSError, match="subfolder text_encoder_3"):
        build_text_encoder(
            TextEncoderConfig(
                preset="sdxl",
                clip_l=ClipLConfig(
                    name=str(repo), subfolder="text_encoder_3", tokenizer_subfolder="tokenizer_2"
                ),
            ),
            "cpu",
        )


def test_a_hub_id_that_cannot_be_fetched_is_one_line_asking_for_a_local_path(monkeypatch,
                                                                             tmp_path):
    """Offline, a hub id used to end 99 lines of traceback with "does not appear to have a
    file named config.json" (issue 15); a missing local folder keeps its own message."""
    from scaletrain.core.config_base import ConfigError
    from scaletrain.data.encoders.image import VAEEncoder
    from scaletrain.data.encoders.text import TransformersTextModel
    from scaletrain.data.preprocess.config import TextModelConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no retries against an unreachable network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ConfigError, match=r"VAE: model 'some-org/some-vae' is not available "
                                          r"offline .*give a local path") as err:
        VAEEncoder("some-org/some-vae", device="cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="clip text encoder: model 'some-org/clip' is not "
                                          "available offline"):
        TransformersTextModel(TextModelConfig(name="some-org/clip"), "clip", False,
                              torch.device("cpu"), torch.float32)
    broken = tmp_path / "vae"
    broken.mkdir()
    with pytest.raises(OSError, match=f"cannot load the VAE from {broken}"):
        VAEEncoder(str(broken), device="cpu")
