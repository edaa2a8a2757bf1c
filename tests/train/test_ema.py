"""Sharded EMA: decay schedules, fragments, re-slicing across layouts, consolidation."""

from __future__ import annotations

import math

import pytest
import torch

from scaletrain.export.consolidate import consolidate_ema_shards
from scaletrain.train.config import EMAConfig
from scaletrain.train.ema import (
    ShardedEMA,
    ema_beta,
    master_weight_fragments,
    power_function_gamma,
)


def test_power_function_gamma_solves_edm2_eq3():
    for sigma_rel in (0.01, 0.05, 0.1, 0.2):
        g = power_function_gamma(sigma_rel)
        assert g > 0
        recovered = math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
        assert recovered == pytest.approx(sigma_rel, rel=1e-9)
    # EDM2 (Karras et al. 2024, sec. 3.1): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
    assert power_function_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_function_gamma(0.10) == pytest.approx(6.94, abs=0.01)


def test_beta_schedules():
    const = EMAConfig(schedule="constant", decay=0.99)
    assert ema_beta(const, 0, 8, 8) == 0.99
    warm = EMAConfig(schedule="warmup", decay=0.999)
    assert ema_beta(warm, 0, 8, 8) == pytest.approx(0.1)
    assert ema_beta(warm, 10**6, 8, 8) == 0.999
    power = EMAConfig(schedule="power", sigma_rel=0.05)
    gamma = power_function_gamma(0.05)
    assert ema_beta(power, 0, 8, 8) == 0.0  # first update copies the weights
    assert ema_beta(power, 9, 80, 8) == pytest.approx((1 - 8 / 80) ** (gamma + 1))
    # The power-function EMA lengthens with training: beta grows towards 1.
    assert ema_beta(power, 99, 800, 8) > ema_beta(power, 9, 80, 8)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_equal_slices_partition_every_element_once(world):
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    seen = {n: torch.zeros(p.numel(), dtype=torch.int64) for n, p in model.named_parameters()}
    for rank in range(world):
        for f in master_weight_fragments(model.named_parameters(), rank, world):
            seen[f.name][f.offset:f.offset + f.numel] += 1
            assert torch.equal(f.source(), dict(model.named_parameters())[f.name].view(-1)[
                f.offset:f.offset + f.numel])
    assert sum(int(s.sum()) for s in seen.values()) == total
    assert all(bool((s == 1).all()) for s in seen.values())


def test_sharded_ema_matches_unsharded_and_reslices(tmp_path):
    cfg = EMAConfig(schedule="constant", decay=0.9)
    model = _model()
    params = dict(model.named_parameters())
    shards = [ShardedEMA(cfg, master_weight_fragments(model.named_parameters(), r, 3))
              for r in range(3)]
    reference = {n: p.detach().clone() for n, p in params.items()}
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        for ema in shards:
            ema.update(samples_after=8 * (step + 1), batch_samples=8)
        for n, p in params.items():
            reference[n] = torch.lerp(reference[n], p.detach(), 0.1)
    paths = []
    for r, ema in enumerate(shards):
        paths.append(tmp_path / f"rank_{r}.pt")
        torch.save(ema.state_dict(), paths[-1])
    full = consolidate_ema_shards(paths)
    assert set(full) == set(params)
    for n in params:
        assert full[n].shape == params[n].shape
        torch.testing.assert_close(full[n], reference[n], rtol=1e-6, atol=1e-7)
    # Re-slice the 3-way EMA into 2 ranks (a resume at another world size).
    for r in range(2):
        resliced = ShardedEMA(cfg, master_weight_fragments(model.named_parameters(), r, 2))
        resliced.load_shards(paths)
        assert resliced.updates == 4
        for f, t in zip(resliced.fragments, resliced.shadow):
            assert torch.equal(t, full[f.name].view(-1)[f.offset:f.offset + f.numel])


def test_load_shards_reports_missing_coverage(tmp_path):
    cfg = EMAConfig()
    model = _model()
    ema0 = ShardedEMA(cfg, master_weight_fragments(model.named_parameters(), 0, 2))
    torch.save(ema0.state_dict(), tmp_path / "rank_0.pt")
    whole = ShardedEMA(cfg, master_weight_fragments(model.named_parameters(), 0, 1))
    with pytest.raises(ValueError, match="do not cover"):
        whole.load_shards([tmp_path / "rank_0.pt"])
    with pytest.raises(ValueError, match="incomplete"):
        consolidate_ema_shards([tmp_path / "rank_0.pt"])


def test_swapped_into_puts_ema_weights_in_and_restores():
    cfg = EMAConfig(schedule="constant", decay=0.5)
    model = _model()
    ema = ShardedEMA(cfg, master_weight_fragments(model.named_parameters(), 0, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(samples_after=8, batch_samples=8)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    averaged = {f.name: t.view(f.shape) for f, t in zip(ema.fragments, ema.shadow)}
    with ema.swapped_into(model):
        for n, p in model.named_parameters():
            assert torch.equal(p, averaged[n])
            assert not torch.equal(p, trained[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n])
