"""U-Net: faithfulness to diffusers' SDXL U-Net and the U-Net stability options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from diffusers import DDPMScheduler, UNet2DConditionModel

from scaletrain.models import build_model
from scaletrain.models.diffusers_compat import diffusers_config
from scaletrain.models.inputs import example_inputs
from scaletrain.models.layers import time_condition
from scaletrain.models.noise_schedule import log_snr_at, scaled_linear_log_snr_table
from scaletrain.models.unet import ResnetBlock2D, Transformer2DModel


def _inputs(cfg, batch=2, seed=5):
    inputs = example_inputs(cfg, batch_size=batch, generator=torch.Generator().manual_seed(seed))
    inputs["timestep"] = torch.tensor([30.0, 940.0][:batch])
    return inputs


def _diffusers_unet(cfg):
    return UNet2DConditionModel(**diffusers_config(cfg))


@pytest.mark.parametrize("time_conditioning", ["additive", "scale_shift"])
def test_loads_diffusers_weights_by_name_and_matches_its_output(unet_cfg, time_conditioning):
    cfg = unet_cfg(time_conditioning=time_conditioning)
    ref = _diffusers_unet(cfg).eval()
    ours = build_model(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical names: export is a copy
    inputs = _inputs(cfg)
    mask = torch.ones(2, cfg.text_seq_len)
    mask[0, 3:] = 0
    with torch.no_grad():
        expected = ref(**inputs, encoder_attention_mask=mask).sample
        got = ours(**inputs, encoder_attention_mask=mask)
    assert got.shape == expected.shape == inputs["sample"].shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_masked_text_tokens_do_not_affect_the_output(unet_cfg):
    model = build_model(unet_cfg())
    inputs = _inputs(model.config)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"].clone()}
    changed["encoder_hidden_states"][0, 3:] += 100.0
    with torch.no_grad():
        a = model(**inputs, encoder_attention_mask=mask)
        b = model(**changed, encoder_attention_mask=mask)
    torch.testing.assert_close(a, b)


def test_missing_added_conditioning_is_a_clear_error(unet_cfg):
    model = build_model(unet_cfg())
    inputs = _inputs(model.config)
    inputs["added_cond_kwargs"] = {"text_embeds": inputs["added_cond_kwargs"]["text_embeds"]}
    with pytest.raises(ValueError, match="time_ids"):
        model(**inputs)


# --------------------------------------------------------------------------- time conditioning


def test_adagn_modulates_scale_while_additive_bias_is_normalised_away():
    """GroupNorm with one channel per group removes an additive per-channel bias entirely;
    AdaGN's scale-shift acts after the norm, so the time signal survives (seed 001 § 2.2.3)."""
    channels = 8
    norm = nn.GroupNorm(channels, channels, affine=False)
    h = torch.randn(2, channels, 6, 6)
    e1, e2 = torch.randn(2, channels), torch.randn(2, channels)
    torch.testing.assert_close(
        time_condition(h, e1, norm, "additive"), time_condition(h, e2, norm, "additive"), atol=1e-5, rtol=0
    )
    s = torch.randn(2, 2 * channels)
    scale, shift = s.chunk(2, dim=1)
    expected = norm(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    torch.testing.assert_close(time_condition(h, s, norm, "scale_shift"), expected)
    std = time_condition(h, s, norm, "scale_shift").std(dim=(2, 3), unbiased=False)
    torch.testing.assert_close(std, (1 + scale).abs(), atol=1e-3, rtol=1e-3)


def test_time_conditioning_switch_sizes_the_projection(unet_cfg):
    additive = build_model(unet_cfg(time_conditioning="additive"))
    adagn = build_model(unet_cfg(time_conditioning="scale_shift"))
    a = additive.down_blocks[0].resnets[0].time_emb_proj
    b = adagn.down_blocks[0].resnets[0].time_emb_proj
    assert b.out_features == 2 * a.out_features == 2 * 16


# --------------------------------------------------------------------------- zero init


def test_zero_init_makes_every_residual_branch_start_at_zero(unet_cfg):
    model = build_model(unet_cfg(zero_init_residual=True))
    temb = torch.randn(2, model.config.time_embed_dim)
    ctx = torch.randn(2, 5, model.config.cross_attention_dim)
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    attentions = [m for m in model.modules() if isinstance(m, Transformer2DModel)]
    assert resnets and attentions
    with torch.no_grad():
        for block in resnets:
            x = torch.randn(2, block.norm1.num_channels, 4, 4)
            shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
            assert torch.equal(block(x, temb), shortcut)
        for block in attentions:
            x = torch.randn(2, block.norm.num_channels, 4, 4)
            assert torch.equal(block(x, ctx, None), x)
    plain = build_model(unet_cfg(zero_init_residual=False))
    block = plain.down_blocks[0].resnets[0]
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        assert not torch.allclose(block(x, temb), x)


# --------------------------------------------------------------------------- skip scaling


def test_log_snr_matches_diffusers_scaled_linear_schedule():
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    abar = sched.alphas_cumprod.double()
    expected = torch.log(abar / (1 - abar))
    table = scaled_linear_log_snr_table(0.00085, 0.012, 1000)
    torch.testing.assert_close(table, expected, atol=1e-5, rtol=1e-5)
    assert table[0] > 7.0 and table[-1] < -5.0 and (table.diff() < 0).all()
    # fractional timesteps interpolate; out-of-range ones clamp
    t = torch.tensor([10.5, -3.0, 2000.0])
    got = log_snr_at(t, table)
    torch.testing.assert_close(got[0], ((table[10] + table[11]) / 2).float())
    torch.testing.assert_close(got[1:], torch.stack([table[0], table[-1]]).float())


def test_skip_weights_follow_their_formulas(unet_cfg):
    t = torch.tensor([0.0, 500.0, 999.0])
    assert build_model(unet_cfg(skip_scaling="none")).skip_weights(t) == [None] * 3
    assert build_model(unet_cfg(skip_scaling="constant")).skip_weights(t) == [1 / math.sqrt(2)] * 3
    kappa = [1.0, 0.7, 0.4]  # "deep-small, shallow-large"
    assert build_model(unet_cfg(skip_scaling="per_level", skip_kappa=kappa)).skip_weights(t) == kappa

    beta, tau = 1.5, -1.0
    model = build_model(unet_cfg(skip_scaling="log_snr", skip_kappa=kappa, skip_snr_beta=beta, skip_snr_tau=tau))
    table = scaled_linear_log_snr_table()
    gate = torch.sigmoid(beta * (table[t.long()] - tau)).float()
    weights = model.skip_weights(t)
    for level, k in enumerate(kappa):
        assert weights[level].shape == (3, 1, 1, 1)
        torch.testing.assert_close(weights[level].flatten(), k * gate)
    # High SNR (t=0) lets the skip through; low SNR (t=999) suppresses it.
    assert weights[0].flatten()[0] > 0.99 and weights[0].flatten()[2] < 0.01


def test_merge_scales_the_skip_and_variance_preserving_normalises_both(unet_cfg):
    d, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    plain = build_model(unet_cfg())
    torch.testing.assert_close(plain._merge(0, None, d, s), torch.cat([d, s], 1))
    torch.testing.assert_close(plain._merge(0, 0.5, d, s), torch.cat([d, 0.5 * s], 1))
    vp = build_model(unet_cfg(skip_variance_preserving=True))
    norm = (1 + 0.25) ** -0.5
    torch.testing.assert_close(vp._merge(0, 0.5, d, s), torch.cat([norm * d, 0.5 * norm * s], 1))
    w = torch.tensor([0.0, 2.0])[:, None, None, None]
    merged = vp._merge(0, w, d, s)
    torch.testing.assert_close(merged[:, :4], d / torch.sqrt(1 + w**2))
    torch.testing.assert_close(merged[:, 4:], w * s / torch.sqrt(1 + w**2))
    # The defining property: d' + s' keeps unit variance for independent unit-variance d, s.
    big_d, big_s = torch.randn(1, 1, 500, 500), torch.randn(1, 1, 500, 500)
    for weight in (None, 0.3, 3.0):
        out = vp._merge(0, weight, big_d, big_s)
        assert abs((out[:, :1] + out[:, 1:]).var().item() - 1.0) < 0.02


def test_skip_scaling_is_applied_in_the_forward(unet_cfg):
    inputs = _inputs(unet_cfg())
    torch.manual_seed(1)
    none = build_model(unet_cfg(skip_scaling="none"))
    ones = build_model(unet_cfg(skip_scaling="per_level", skip_kappa=[1.0, 1.0, 1.0]))
    ones.load_state_dict(none.state_dict())
    half = build_model(unet_cfg(skip_scaling="per_level", skip_kappa=[1.0, 1.0, 0.5]))
    half.load_state_dict(none.state_dict())
    with torch.no_grad():
        ref = none(**inputs)
        assert torch.equal(ones(**inputs), ref)
        assert not torch.allclose(half(**inputs), ref)


# --------------------------------------------------------------------------- diagnostics


def test_skip_diagnostics_are_the_activation_and_gradient_norm_ratios(unet_cfg):
    model = build_model(unet_cfg(skip_scaling="constant"))
    levels = len(model.config.block_out_channels)
    inputs = _inputs(model.config)
    with torch.no_grad():
        plain = model(**inputs)
    model.set_diagnostics(True)

    # Keep the s', d' tensors the model watches so the ratios can be recomputed here.
    seen = []
    original = model._watch_merge

    def spy(level, d, s):
        d, s = original(level, d, s)
        d.retain_grad()
        s.retain_grad()
        seen.append((level, d, s))
        return d, s

    model._watch_merge = spy
    out = model(**inputs)
    assert torch.equal(out.detach(), plain)
    out.square().mean().backward()
    diag = model.pop_diagnostics()

    expected_keys = {f"skip_ratio/level{i}" for i in range(levels)}
    expected_keys |= {f"skip_grad_ratio/level{i}" for i in range(levels)}
    assert expected_keys <= set(diag)
    for level in range(levels):
        mine = [(d, s) for lvl, d, s in seen if lvl == level]
        act = sum(float(s.detach().norm() / d.detach().norm()) for d, s in mine) / len(mine)
        grad = sum(float(s.grad.norm() / d.grad.norm()) for d, s in mine) / len(mine)
        assert diag[f"skip_ratio/level{level}"] == pytest.approx(act, rel=1e-4)
        assert diag[f"skip_grad_ratio/level{level}"] == pytest.approx(grad, rel=1e-4)
    assert model.pop_diagnostics() == {}

    model.set_diagnostics(False)
    model._watch_merge = original
    model(**inputs).sum().backward()
    assert model.pop_diagnostics() == {}


def test_unet_records_max_attention_logit(unet_cfg):
    model = build_model(unet_cfg(qk_norm=True))
    model.set_diagnostics(True)
    inputs = _inputs(model.config)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"] * 1e4
    with torch.no_grad():
        model(**inputs)
    diag = model.pop_diagnostics()
    assert 0 < diag["max_attn_logit"] <= math.sqrt(model.config.attention_head_dim) * (1 + 1e-5)


# --------------------------------------------------------------------------- checkpointing


def test_gradient_checkpointing_gives_the_same_gradients(unet_cfg):
    model = build_model(unet_cfg())
    inputs = _inputs(model.config)

    def grads():
        model.zero_grad(set_to_none=True)
        model(**inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = grads()
    model.set_gradient_checkpointing(True)
    checkpointed = grads()
    for name, g in reference.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5)
    assert build_model(unet_cfg(gradient_checkpointing=True)).mid_block.gradient_checkpointing
