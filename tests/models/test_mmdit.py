"""MMDiT: faithfulness to diffusers' SD3 transformer and the transformer stability options."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import PatchEmbed

from scaletrain.models import build_model
from scaletrain.models.diffusers_compat import diffusers_config
from scaletrain.models.inputs import example_inputs
from scaletrain.models.layers import (
    Attention,
    FeedForward,
    RMSNorm,
    make_norm,
    mlp_hidden_dim,
    sincos_2d_cropped,
)


def _inputs(cfg, batch=2, height=None, width=None):
    gen = torch.Generator().manual_seed(7)
    h = height or cfg.sample_size
    w = width or cfg.sample_size
    return (
        torch.randn(batch, cfg.in_channels, h, w, generator=gen),
        torch.randn(batch, cfg.text_seq_len, cfg.joint_attention_dim, generator=gen),
        torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
        torch.tensor([20.0, 870.0][:batch]),
    )


def _diffusers_sd3(cfg):
    return SD3Transformer2DModel(**diffusers_config(cfg))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_loads_diffusers_weights_by_name_and_matches_its_output(mmdit_cfg, qk_norm):
    cfg = mmdit_cfg(qk_norm=qk_norm, adaln_zero=False)
    ref = _diffusers_sd3(cfg).eval()
    ours = build_model(cfg).eval()
    state = {k: v for k, v in ref.state_dict().items() if k != "pos_embed.pos_embed"}
    ours.load_state_dict(state, strict=True)  # identical names: export is a key-for-key copy
    # A non-square latent exercises the centre crop of SD3's positional grid.
    x, c, p, t = _inputs(cfg, height=16, width=12)
    with torch.no_grad():
        expected = ref(x, c, p, t).sample
        got = ours(x, c, p, t)
    assert got.shape == expected.shape == x.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_positions_equal_sd3_cropped_table():
    ref = PatchEmbed(height=64, width=64, patch_size=2, in_channels=4, embed_dim=64, pos_embed_max_size=48)
    expected = ref.cropped_pos_embed(40, 56)[0]  # in latent pixels: a 20x28 grid
    got = sincos_2d_cropped(64, 20, 28, max_size=48, base_size=32)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_adaln_zero_blocks_are_exactly_identity_at_init(mmdit_cfg):
    cfg = mmdit_cfg(adaln_zero=True, layer_scale_init=None)
    model = build_model(cfg)
    x, c, p, t = _inputs(cfg)
    tokens = torch.randn(2, 64, cfg.hidden_size)
    text = torch.randn(2, cfg.text_seq_len, cfg.hidden_size)
    cond = torch.randn(2, cfg.hidden_size)
    with torch.no_grad():
        for block in model.transformer_blocks:
            out_x, out_c = block(tokens, text, cond)
            assert torch.equal(out_x, tokens)
            if not block.context_pre_only:
                assert torch.equal(out_c, text)
        assert torch.equal(model(x, c, p, t), torch.zeros_like(x))  # DiT: zero final layer

    # The property is the switch's doing: without it the blocks move their inputs.
    plain = build_model(mmdit_cfg(adaln_zero=False))
    with torch.no_grad():
        out_x, _ = plain.transformer_blocks[0](tokens, text, cond)
    assert not torch.allclose(out_x, tokens)


def _branch_updates(block, tokens, text, cond):
    """Image-stream update of the attention branch alone and of the MLP branch alone."""
    updates = []
    with torch.no_grad():
        for silence in ("ff.net.2", "attn.to_out.0"):
            saved = {n: p.clone() for n, p in block.named_parameters() if n.startswith(silence)}
            for n, p in block.named_parameters():
                if n in saved:
                    p.zero_()
            out, _ = block(tokens, text, cond)
            updates.append(out - tokens)
            for n, p in block.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    return updates


@pytest.mark.parametrize(
    "option, factor",
    [({"residual_scale": 0.5}, 0.5), ({"layer_scale_init": 1e-3}, 1e-3)],
)
def test_residual_scale_and_layerscale_scale_each_branch(mmdit_cfg, option, factor):
    """h + beta * g * LS(F(h)): each branch's update shrinks by exactly beta (or LS's init)."""
    base = build_model(mmdit_cfg(adaln_zero=False))
    scaled = build_model(mmdit_cfg(adaln_zero=False, **option))
    missing, unexpected = scaled.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".ls_" in k for k in missing)
    tokens = torch.randn(2, 64, base.config.hidden_size)
    text = torch.randn(2, 5, base.config.hidden_size)
    cond = torch.randn(2, base.config.hidden_size)
    want = _branch_updates(base.transformer_blocks[0], tokens, text, cond)
    got = _branch_updates(scaled.transformer_blocks[0], tokens, text, cond)
    for g, w in zip(got, want):
        assert w.abs().max() > 1e-3
        torch.testing.assert_close(g, factor * w, atol=1e-6, rtol=1e-4)


def test_swiglu_and_gelu_mlps():
    dim = 256
    gelu_hidden = mlp_hidden_dim(dim, 4.0, "gelu_tanh")
    swiglu_hidden = mlp_hidden_dim(dim, 4.0, "swiglu")
    gelu, swiglu = FeedForward(dim, gelu_hidden, "gelu_tanh"), FeedForward(dim, swiglu_hidden, "swiglu")
    n_gelu = sum(p.numel() for p in gelu.parameters())
    n_swiglu = sum(p.numel() for p in swiglu.parameters())
    assert abs(n_swiglu - n_gelu) / n_gelu < 0.02  # 2/3-width gated MLP: same budget
    x = torch.randn(3, 7, dim)
    a, gate = swiglu.net[0].proj(x).chunk(2, dim=-1)
    expected = swiglu.net[2](a * torch.nn.functional.silu(gate))  # Shazeer 2020: value * SiLU(gate)
    torch.testing.assert_close(swiglu(x), expected)
    h = gelu.net[0].proj(x)
    torch.testing.assert_close(gelu(x), gelu.net[2](torch.nn.functional.gelu(h, approximate="tanh")))


def test_mmdit_mlp_and_norm_switches_change_the_blocks(mmdit_cfg):
    model = build_model(mmdit_cfg(mlp="swiglu", norm="rmsnorm"))
    block = model.transformer_blocks[0]
    assert block.ff.net[0].kind == "swiglu"
    assert isinstance(block.norm2, RMSNorm) and isinstance(block.norm1.norm, RMSNorm)
    assert isinstance(model.norm_out.norm, RMSNorm)
    x, c, p, t = _inputs(model.config)
    assert torch.isfinite(model(x, c, p, t)).all()


def test_rmsnorm_rescales_without_centring_and_layernorm_centres():
    x = torch.randn(4, 10, 32) * 3 + 5
    rms, ln = make_norm("rmsnorm", 32, 1e-6), make_norm("layernorm", 32, 1e-6)
    y = rms(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4, 10), atol=1e-4, rtol=0)
    assert y.mean(-1).abs().min() > 0.5  # the mean survives RMSNorm
    z = ln(x)
    torch.testing.assert_close(z.mean(-1), torch.zeros(4, 10), atol=1e-5, rtol=0)


def _max_logit(attn: Attention, x: torch.Tensor) -> float:
    attn.record_max_logit, attn.max_logit = True, None
    with torch.no_grad():
        attn(x)
    return float(attn.max_logit)


def test_qk_norm_bounds_attention_logits_whatever_the_input_scale():
    head_dim = 16
    with_norm = Attention(32, heads=2, head_dim=head_dim, qk_norm=True)
    without = Attention(32, heads=2, head_dim=head_dim, qk_norm=False)
    without.load_state_dict(with_norm.state_dict(), strict=False)
    x = torch.randn(2, 40, 32)
    bound = math.sqrt(head_dim)  # |q.k| / sqrt(d) <= |q||k| / sqrt(d) = sqrt(d) for unit-RMS q, k
    for scale in (1.0, 1e2, 1e4):
        assert _max_logit(with_norm, x * scale) <= bound * (1 + 1e-5)
    small, large = _max_logit(without, x), _max_logit(without, x * 1e2)
    assert large > 1e3 * small > 0  # without QK-norm logits grow with the square of the scale


def test_recorded_max_logit_is_the_true_maximum():
    attn = Attention(32, heads=2, head_dim=16, qk_norm=False)
    x = torch.randn(1, 30, 32)
    with torch.no_grad():
        q = attn.to_q(x).view(1, 30, 2, 16).transpose(1, 2)
        k = attn.to_k(x).view(1, 30, 2, 16).transpose(1, 2)
    expected = (q @ k.transpose(-1, -2) / 4.0).max()
    assert _max_logit(attn, x) == pytest.approx(float(expected), rel=1e-5)


def test_diagnostics_record_residual_updates_and_max_logit(mmdit_cfg):
    cfg = mmdit_cfg(adaln_zero=False)
    model = build_model(cfg)
    x, c, p, t = _inputs(cfg)
    with torch.no_grad():
        plain = model(x, c, p, t)
    assert model.pop_diagnostics() == {}  # off: nothing recorded

    model.set_diagnostics(True)
    with torch.no_grad():
        watched = model(x, c, p, t)
    assert torch.equal(plain, watched)  # diagnostics never change the result
    diag = model.pop_diagnostics()
    assert set(diag) == {f"resid_update/block{i}" for i in range(cfg.depth)} | {"max_attn_logit"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in diag.values())
    assert all(diag[f"resid_update/block{i}"] > 0 for i in range(cfg.depth))
    assert model.pop_diagnostics() == {}  # pop clears

    # AdaLN-Zero at init: every block update is exactly zero.
    zero = build_model(mmdit_cfg(adaln_zero=True))
    zero.set_diagnostics(True)
    with torch.no_grad():
        zero(x, c, p, t)
    diag = zero.pop_diagnostics()
    assert all(diag[f"resid_update/block{i}"] == 0.0 for i in range(cfg.depth))

    model.set_diagnostics(False)
    with torch.no_grad():
        model(x, c, p, t)
    assert model.pop_diagnostics() == {}


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_tensor_count(model, inputs) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    del out
    return count


def test_gradient_checkpointing_gives_the_same_gradients_with_fewer_saved_tensors(mmdit_cfg):
    model = build_model(mmdit_cfg(adaln_zero=False))
    inputs = example_inputs(model.config, batch_size=2, generator=torch.Generator().manual_seed(3))
    reference = _grads(model, inputs)
    saved_plain = _saved_tensor_count(model, inputs)
    model.set_gradient_checkpointing(True)
    checkpointed = _grads(model, inputs)
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5)
    assert _saved_tensor_count(model, inputs) < saved_plain / 2


def test_forward_accepts_scalar_timestep_and_checks_patch_divisibility(mmdit_cfg):
    model = build_model(mmdit_cfg())
    x, c, p, _ = _inputs(model.config)
    assert model(x, c, p, 500.0).shape == x.shape
    with pytest.raises(ValueError, match="patch_size"):
        model(x[..., :15], c, p, 500.0)
