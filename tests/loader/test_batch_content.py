"""What a batch holds: the latents' stored mean and std (drawn and normalised in the step),
text layout (SDXL and SD3), time_ids."""

from __future__ import annotations

import pytest
import torch

from scaletrain.data.loader import DataConfig, build_train_loader
from scaletrain.diffusion.latents import draw_latents


def first_batches(path, steps, seed=3, **cfg):
    config = DataConfig(path=str(path), **{"batch_size": 4, "num_workers": 0, **cfg})
    loader = build_train_loader(config, 0, 1, seed)
    it = iter(loader)
    return loader, [next(it) for _ in range(steps)]


def test_batch_keys_shapes_and_dtypes(dataset):
    loader, (batch,) = first_batches(dataset.root, 1, max_text_tokens=12)
    b = 4
    h, w = batch["latents_mean"].shape[-2:]
    # Stored dtype (the fixture stores bfloat16): the step converts on its device.
    for name in ("latents_mean", "latents_std"):
        assert batch[name].shape == (b, 4, h, w) and batch[name].dtype == torch.bfloat16
    assert "latents" not in batch
    assert batch["encoder_hidden_states"].shape == (b, 12, 16)
    assert batch["encoder_hidden_states"].dtype == torch.float32
    assert "encoder_attention_mask" not in batch  # the models attend to every position
    assert batch["pooled"].shape == (b, 8) and batch["pooled"].dtype == torch.float32
    assert batch["time_ids"].shape == (b, 6) and batch["time_ids"].dtype == torch.float32
    assert len(batch["keys"]) == b and batch["epochs"] == [0] * b
    assert loader.samples_per_epoch == 96
    assert loader.steps_per_epoch == 96 // 4


def test_text_time_ids_and_pooled_match_the_stored_sample(dataset):
    _, batches = first_batches(dataset.root, 6, max_text_tokens=12)
    for batch in batches:
        for i, key in enumerate(batch["keys"]):
            _, _, text, meta = dataset.samples[key]
            hidden = text["hidden_states"].float()
            n = hidden.shape[0]
            assert torch.equal(batch["encoder_hidden_states"][i, :n], hidden)
            assert not batch["encoder_hidden_states"][i, n:].any()  # zero padding
            assert torch.equal(batch["pooled"][i], text["pooled"].float())
            expected = meta["original_size"] + meta["crop_top_left"] + meta["target_size"]
            assert batch["time_ids"][i].tolist() == [float(v) for v in expected]


def test_latents_without_std_are_the_normalised_mean(make_dataset):
    data = make_dataset(zero_std=True)
    _, batches = first_batches(data.root, 4)
    for batch in batches:
        x0 = draw_latents(batch, torch.Generator().manual_seed(0))
        for i, key in enumerate(batch["keys"]):
            mean = data.samples[key][1]["mean"].float()
            expected = (mean - data.shift) * data.scaling
            assert torch.allclose(x0[i], expected, atol=1e-5)


def test_batches_carry_the_stored_mean_and_std_reproducibly(dataset):
    # 96 samples / 4 = 24 batches per epoch; 30 batches reach into epoch 2.
    _, run_a = first_batches(dataset.root, 30)
    _, run_b = first_batches(dataset.root, 30)
    for batch_a, batch_b in zip(run_a, run_b):
        assert batch_a["keys"] == batch_b["keys"]
        assert torch.equal(batch_a["latents_mean"], batch_b["latents_mean"])
        assert torch.equal(batch_a["latents_std"], batch_b["latents_std"])
        assert batch_a["latent_scaling_factor"] == dataset.scaling
        assert batch_a["latent_shift_factor"] == dataset.shift
        for i, key in enumerate(batch_a["keys"]):
            _, latent, _, _ = dataset.samples[key]
            assert torch.equal(batch_a["latents_mean"][i], latent["mean"])
            assert torch.equal(batch_a["latents_std"][i], latent["std"])


def test_the_step_draws_mean_plus_std_eps_from_its_generator(dataset):
    _, (batch,) = first_batches(dataset.root, 1)
    x0 = draw_latents(batch, torch.Generator().manual_seed(11))
    eps = torch.randn(batch["latents_mean"].shape, generator=torch.Generator().manual_seed(11))
    mean, std = batch["latents_mean"].float(), batch["latents_std"].float()
    assert x0.dtype == torch.float32
    assert torch.allclose(x0, (mean + std * eps - dataset.shift) * dataset.scaling, atol=1e-5)
    # Another step's generator draws another posterior sample of the same batch.
    other = draw_latents(batch, torch.Generator().manual_seed(12))
    assert not torch.allclose(x0, other)


def test_sample_latents_false_uses_the_mean(dataset):
    _, (batch,) = first_batches(dataset.root, 1, sample_latents=False)
    for i, key in enumerate(batch["keys"]):
        mean = dataset.samples[key][1]["mean"].float()
        assert torch.allclose(
            batch["latents"][i], (mean - dataset.shift) * dataset.scaling, atol=1e-5
        )


def test_sd3_context_is_clip_padded_to_t5_width_then_t5(make_dataset):
    data = make_dataset(text_dim=16, t5_dim=24)
    _, batches = first_batches(data.root, 3, max_text_tokens=20)
    for batch in batches:
        assert batch["encoder_hidden_states"].shape == (4, 20, 24)
        for i, key in enumerate(batch["keys"]):
            text = data.samples[key][2]
            clip, t5 = text["hidden_states"].float(), text["t5_hidden_states"].float()
            n, m = clip.shape[0], t5.shape[0]
            ctx = batch["encoder_hidden_states"][i]
            assert torch.equal(ctx[:n, :16], clip)
            assert not ctx[:n, 16:].any()  # CLIP zero-padded on channels to the T5 width
            assert torch.equal(ctx[n : n + m], t5)
            assert not ctx[n + m :].any()


def test_too_long_text_is_truncated_and_counted(make_dataset):
    data = make_dataset(t5_dim=24)
    loader, batches = first_batches(data.root, 3, max_text_tokens=5)
    for batch in batches:
        assert batch["encoder_hidden_states"].shape[1] == 5
        # Every sample has >= 5 real tokens: no zero padding is left.
        assert batch["encoder_hidden_states"].abs().sum(-1).gt(0).all()
    assert loader.metrics()["truncated_texts"] == 12


def test_empty_conditioning_in_the_batch_layout(make_dataset):
    data = make_dataset(text_dim=16, t5_dim=24)
    config = DataConfig(path=str(data.root), batch_size=4, num_workers=0, max_text_tokens=20)
    loader = build_train_loader(config, 0, 1, 0)
    empty = loader.empty_conditioning()
    assert empty["encoder_hidden_states"].shape == (20, 24)
    real = empty["encoder_hidden_states"].abs().sum(-1).gt(0)
    assert real.tolist() == [True] * 3 + [False] * 17  # 2 CLIP + 1 T5 tokens, then padding
    assert empty["pooled"].shape == (8,)


@pytest.mark.parametrize("buffer", [0, 1])
def test_without_shuffle_buffer_shards_read_in_stored_order(make_dataset, buffer):
    data = make_dataset(buckets=((64, 64),), num_shards=2, per_shard=8)
    _, batches = first_batches(data.root, 2, shuffle_buffer=buffer)
    keys = batches[0]["keys"] + batches[1]["keys"]
    shard = data.samples[keys[0]][0]
    assert keys == data.shard_keys[shard]
