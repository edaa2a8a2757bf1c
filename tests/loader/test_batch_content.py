"""What a batch holds: latent draws and normalisation, text layout (SDXL and SD3), time_ids."""

from __future__ import annotations

import pytest
import torch

from scaletrain.data.loader import DataConfig, build_train_loader
from scaletrain.data.loader.plan import latent_seed


def first_batches(path, steps, seed=3, **cfg):
    config = DataConfig(path=str(path), **{"batch_size": 4, "num_workers": 0, **cfg})
    loader = build_train_loader(config, 0, 1, seed)
    it = iter(loader)
    return loader, [next(it) for _ in range(steps)]


def test_batch_keys_shapes_and_dtypes(dataset):
    loader, (batch,) = first_batches(dataset.root, 1, max_text_tokens=12)
    b = 4
    h, w = batch["latents"].shape[-2:]
    assert batch["latents"].shape == (b, 4, h, w) and batch["latents"].dtype == torch.float32
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
        for i, key in enumerate(batch["keys"]):
            mean = data.samples[key][1]["mean"].float()
            expected = (mean - data.shift) * data.scaling
            assert torch.allclose(batch["latents"][i], expected, atol=1e-5)


def test_latent_draws_are_seeded_reproducible_and_new_each_epoch(dataset):
    # 96 samples / 4 = 24 batches per epoch; 60 batches reach well into epoch 2.
    _, run_a = first_batches(dataset.root, 60)
    _, run_b = first_batches(dataset.root, 60)
    latents: dict[tuple[int, str], torch.Tensor] = {}
    for batch_a, batch_b in zip(run_a, run_b):
        assert batch_a["keys"] == batch_b["keys"]
        assert torch.equal(batch_a["latents"], batch_b["latents"])
        for i, (epoch, key) in enumerate(zip(batch_a["epochs"], batch_a["keys"])):
            latents[epoch, key] = batch_a["latents"][i]
    both = [k for (e, k) in latents if e == 0 and (1, k) in latents]
    assert len(both) > 50
    for key in both:
        assert not torch.allclose(latents[0, key], latents[1, key])
        # z = mean + std * eps with eps from the generator seeded by (seed, epoch, key).
        _, latent, _, _ = dataset.samples[key]
        mean, std = latent["mean"].float(), latent["std"].float()
        for epoch in (0, 1):
            gen = torch.Generator().manual_seed(latent_seed(3, epoch, key))
            eps = torch.randn(mean.shape, generator=gen)
            expected = (mean + std * eps - dataset.shift) * dataset.scaling
            assert torch.allclose(latents[epoch, key], expected, atol=1e-5)
    # A different seed draws different noise.
    _, other = first_batches(dataset.root, 1, seed=4)
    assert other[0]["keys"] != run_a[0]["keys"] or not torch.equal(
        other[0]["latents"], run_a[0]["latents"]
    )


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
