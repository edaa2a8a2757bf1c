"""Classifier-free guidance and guidance rescale (Lin et al. 2024 sec. 3.4)."""

from __future__ import annotations

import torch

from scaletrain.diffusion import classifier_free_guidance


def _preds():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g) * 0.5 + 1


def test_scale_one_is_the_conditional_prediction():
    cond, uncond = _preds()
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0, rescale=0.7), cond)


def test_guidance_formula():
    cond, uncond = _preds()
    out = classifier_free_guidance(cond, uncond, 7.5)
    assert torch.allclose(out, uncond + 7.5 * (cond - uncond))
    assert torch.allclose(classifier_free_guidance(cond, uncond, 0.0), uncond)


def test_guidance_rescale_formula():
    cond, uncond = _preds()
    w, phi = 6.0, 0.7
    cfg = uncond + w * (cond - uncond)
    # eq. 15-16, std per sample over (C, H, W)
    std_pos = cond.flatten(1).std(1).reshape(-1, 1, 1, 1)
    std_cfg = cfg.flatten(1).std(1).reshape(-1, 1, 1, 1)
    expected = phi * cfg * std_pos / std_cfg + (1 - phi) * cfg
    out = classifier_free_guidance(cond, uncond, w, rescale=phi)
    assert torch.allclose(out, expected, atol=1e-6)
    # phi = 1 brings each sample's std back to the conditional prediction's.
    full = classifier_free_guidance(cond, uncond, w, rescale=1.0)
    assert torch.allclose(full.flatten(1).std(1), cond.flatten(1).std(1), rtol=1e-5)
    assert not torch.allclose(cfg.flatten(1).std(1), cond.flatten(1).std(1), rtol=1e-2)
    assert torch.allclose(classifier_free_guidance(cond, uncond, w, rescale=0.0), cfg)
