"""Classifier-free-guidance dropout and null conditioning."""

from __future__ import annotations

import pytest
import torch

from scaletrain.diffusion import CFGDropout, DiffusionConfig, build_objective, make_uncond
from scaletrain.diffusion.conditioning import drop_conditioning

B, L, D, P = 40_000, 4, 3, 2


def _cond(b=B):
    """Distinct non-zero values per row, so a replaced row is recognisable."""
    rows = torch.arange(1, b + 1, dtype=torch.float32)
    return {
        "encoder_hidden_states": rows.reshape(-1, 1, 1).expand(b, L, D).clone(),
        "pooled": rows.reshape(-1, 1).expand(b, P).clone() + 0.5,
        "time_ids": torch.full((b, 6), 1024.0),
    }


NULL = {"encoder_hidden_states": torch.full((2, D), -7.0), "pooled": torch.full((P,), -3.0)}


def _dropped_rows(before, after):
    changed = {}
    for key in ("encoder_hidden_states", "pooled", "time_ids"):
        changed[key] = (before[key] != after[key]).flatten(1).any(1)
    return changed


def test_dropout_rates_are_the_configured_probabilities():
    dropout = CFGDropout(prompt=0.1, text=0.2, pooled=0.05, time_ids=0.3)
    cond = _cond()
    out, masks = dropout(cond, torch.Generator().manual_seed(0))
    changed = _dropped_rows(cond, out)
    # Independent draws, plus the joint prompt drop: P(text) = 1 - 0.9*0.8, P(pooled) =
    # 1 - 0.9*0.95, P(both) = 0.1 + 0.9*0.2*0.05.
    expected = {
        "encoder_hidden_states": 0.28,
        "pooled": 0.145,
        "time_ids": 0.3,
    }
    for key, p in expected.items():
        rate = changed[key].double().mean().item()
        assert rate == pytest.approx(p, abs=5 * (p * (1 - p) / B) ** 0.5), key
    both = (changed["encoder_hidden_states"] & changed["pooled"]).double().mean().item()
    assert both == pytest.approx(0.109, abs=5 * (0.109 * 0.891 / B) ** 0.5)
    # time_ids are dropped independently of the text: P(both) = 0.28 * 0.3.
    text_ids = (changed["encoder_hidden_states"] & changed["time_ids"]).double().mean().item()
    assert text_ids == pytest.approx(0.084, abs=5 * (0.084 * 0.916 / B) ** 0.5)
    # The returned masks are exactly the replaced rows.
    assert torch.equal(masks["text"], changed["encoder_hidden_states"])
    assert torch.equal(masks["pooled"], changed["pooled"])
    assert torch.equal(masks["time_ids"], changed["time_ids"])


def test_zero_probabilities_drop_nothing_and_one_drops_everything():
    cond = _cond(100)
    out, _ = CFGDropout(prompt=0.0)(cond, torch.Generator().manual_seed(0))
    for key in cond:
        assert torch.equal(out[key], cond[key])
    out, _ = CFGDropout(prompt=1.0, time_ids=1.0)(cond, torch.Generator().manual_seed(0))
    assert not out["encoder_hidden_states"].any() and not out["pooled"].any()
    assert not out["time_ids"].any()


def test_zeros_replacement():
    cond = _cond(64)
    out, masks = CFGDropout(prompt=0.5, time_ids=0.5)(cond, torch.Generator().manual_seed(1))
    text, ids = masks["text"], masks["time_ids"]
    assert 0 < text.sum() < 64 and 0 < ids.sum() < 64
    assert not out["encoder_hidden_states"][text].any() and not out["pooled"][text].any()
    assert not out["time_ids"][ids].any()
    for key in cond:  # untouched rows are bit-identical
        keep = ~(ids if key == "time_ids" else text)
        assert torch.equal(out[key][keep], cond[key][keep])


def test_empty_prompt_replacement_pads_and_cuts_like_a_caption():
    cond = _cond(64)
    dropout = CFGDropout(prompt=0.5, mode="empty_prompt")
    out, masks = dropout(cond, torch.Generator().manual_seed(1), NULL)
    text = masks["text"]
    hidden = out["encoder_hidden_states"][text]
    assert (hidden[:, :2] == -7.0).all() and (hidden[:, 2:] == 0).all()  # zero-padded to L
    assert (out["pooled"][text] == -3.0).all()
    assert torch.equal(out["encoder_hidden_states"][~text], cond["encoder_hidden_states"][~text])
    # An encoding longer than L is cut to L, as the loader cuts a caption.
    padded = {
        "encoder_hidden_states": torch.cat([torch.full((2, D), -7.0), torch.zeros(4, D)]),
        "pooled": NULL["pooled"],
    }
    out2, _ = dropout(cond, torch.Generator().manual_seed(1), padded)
    assert torch.equal(out2["encoder_hidden_states"], out["encoder_hidden_states"])
    long = {"encoder_hidden_states": torch.full((L + 3, D), -7.0), "pooled": NULL["pooled"]}
    out3, _ = dropout(cond, torch.Generator().manual_seed(1), long)
    assert (out3["encoder_hidden_states"][text] == -7.0).all()


def test_empty_prompt_errors_are_clear():
    cond = _cond(8)
    every = torch.ones(8, dtype=torch.bool)
    kw = dict(text=every, pooled=every, time_ids=~every, mode="empty_prompt")
    with pytest.raises(ValueError, match="empty_prompt.*null_cond"):
        drop_conditioning(cond, **kw)
    with pytest.raises(ValueError, match=r"expected \(L, 3\)"):
        drop_conditioning(cond, **kw, null_cond={**NULL, "encoder_hidden_states": torch.ones(2, 5)})
    with pytest.raises(ValueError, match="pooled"):
        drop_conditioning(cond, **kw, null_cond={**NULL, "pooled": torch.ones(5)})


def test_dropout_is_reproducible_and_changes_every_step():
    dropout = CFGDropout(prompt=0.3)
    cond = _cond(256)
    a, ma = dropout(cond, torch.Generator().manual_seed(5))
    b, mb = dropout(cond, torch.Generator().manual_seed(5))
    assert torch.equal(ma["text"], mb["text"])
    g = torch.Generator().manual_seed(5)
    _, first = dropout(cond, g)
    _, second = dropout(cond, g)
    assert not torch.equal(first["text"], second["text"])


def test_objective_applies_dropout_with_batch_or_constructor_null_cond():
    cfg = DiffusionConfig(cfg_drop_prompt=0.25, cfg_null="empty_prompt")
    cond = _cond(4000)
    batch = {"latents": torch.randn(4000, 1, 2, 2), **cond}
    seen = {}

    def model_fn(x, t, c):
        seen.update(c)
        return torch.zeros_like(x)

    _, logs = build_objective(cfg, null_cond=NULL)(
        model_fn, batch, torch.Generator().manual_seed(0)
    )
    dropped = (seen["pooled"] == -3.0).all(1)
    assert torch.equal(dropped, logs["cfg_dropped_text"])
    assert dropped.double().mean().item() == pytest.approx(
        0.25, abs=5 * (0.25 * 0.75 / 4000) ** 0.5
    )
    assert torch.equal(seen["time_ids"], cond["time_ids"])  # not configured to drop
    # The batch's null_cond wins over the constructor's.
    other = {"encoder_hidden_states": torch.full((1, D), 9.0), "pooled": torch.full((P,), 9.0)}
    build_objective(cfg, null_cond=NULL)(
        model_fn, {**batch, "null_cond": other}, torch.Generator().manual_seed(0)
    )
    assert torch.equal((seen["pooled"] == 9.0).all(1), dropped)  # same seed, same rows
    with pytest.raises(ValueError, match="empty_prompt"):
        build_objective(cfg)(model_fn, batch, torch.Generator().manual_seed(0))


def test_make_uncond():
    cond = _cond(3)
    zeros = make_uncond(cond)
    assert not zeros["encoder_hidden_states"].any() and not zeros["pooled"].any()
    assert torch.equal(zeros["time_ids"], cond["time_ids"])  # SDXL guides with the same time_ids
    empty = make_uncond(cond, "empty_prompt", NULL, drop_time_ids=True)
    assert (empty["pooled"] == -3.0).all() and not empty["time_ids"].any()
    assert (empty["encoder_hidden_states"][:, :2] == -7.0).all()
