"""make_model_fn against real (tiny) diffusers backbones, end to end through the objective and
a sampler: the argument names of DESIGN.md's model interface."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from scaletrain.diffusion import (
    DiffusionConfig,
    build_objective,
    build_sampler,
    make_model_fn,
    make_uncond,
)

B, L, D, P = 2, 5, 24, 16


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=D,
        attention_head_dim=4,
        norm_num_groups=8,
        addition_embed_type="text_time",  # SDXL: pooled text + micro-conditioning time_ids
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=P + 6 * 8,
    )


def _mmdit():
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=D,
        caption_projection_dim=16,
        pooled_projection_dim=P,
        pos_embed_max_size=16,
    )


def _batch():
    g = torch.Generator().manual_seed(0)
    return {
        "latents": torch.randn(B, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(B, L, D, generator=g),
        "pooled": torch.randn(B, P, generator=g),
        "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * B),
        "keys": ["a", "b"],
    }


def test_unet_model_fn_calls_with_sdxl_names_and_trains():
    model, batch = _unet(), _batch()
    fn = make_model_fn(model, "unet")
    x, t = batch["latents"], torch.tensor([10.0, 900.0])
    direct = model(
        sample=x,
        timestep=t,
        encoder_hidden_states=batch["encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]},
    ).sample
    assert torch.equal(fn(x, t, batch), direct)
    # The pooled embedding and time_ids really reach the network.
    assert not torch.allclose(fn(x, t, {**batch, "time_ids": batch["time_ids"] * 0}), direct)

    objective = build_objective(DiffusionConfig(objective="v", loss_weighting="min_snr"))
    loss, logs = objective(fn, batch, torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    assert all(p.grad is not None for p in model.conv_in.parameters())

    sampler = build_sampler(DiffusionConfig(objective="v"), steps=2, guidance_scale=3.0)
    cond = {k: batch[k] for k in ("encoder_hidden_states", "pooled", "time_ids")}
    out = sampler(fn, (B, 4, 8, 8), cond, make_uncond(cond), generator=torch.Generator())
    assert out.shape == (B, 4, 8, 8) and torch.isfinite(out).all()


def test_mmdit_model_fn_calls_with_sd3_names_and_trains():
    model, batch = _mmdit(), _batch()
    fn = make_model_fn(model, "mmdit")
    x, t = batch["latents"], torch.tensor([10.0, 900.0])
    direct = model(
        hidden_states=x,
        encoder_hidden_states=batch["encoder_hidden_states"],
        pooled_projections=batch["pooled"],
        timestep=t,
    ).sample
    assert torch.equal(fn(x, t, batch), direct)

    cfg = DiffusionConfig(objective="flow", timestep_sampling="logit_normal", shift=3.0)
    loss, logs = build_objective(cfg)(fn, batch, torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert torch.isfinite(loss).all() and ((logs["timesteps"] > 0) & (logs["timesteps"] < 1)).all()

    sampler = build_sampler(cfg, "heun", steps=2, guidance_scale=3.0, guidance_rescale=0.5)
    cond = {k: batch[k] for k in ("encoder_hidden_states", "pooled")}
    out = sampler(fn, (B, 4, 8, 8), cond, make_uncond(cond), generator=torch.Generator())
    assert out.shape == (B, 4, 8, 8) and torch.isfinite(out).all()
