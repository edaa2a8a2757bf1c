"""The ZeRO memory benchmark's measurement agrees with the formula on a small model."""

import pytest

from benchmarks.bench_zero_memory import CATEGORIES, formula_bytes_per_param, run_stage


def test_formula_divides_as_each_stage_shards():
    total = {s: sum(formula_bytes_per_param(s, 4).values()) for s in range(4)}
    assert total == {0: 17.0, 1: 8.0, 2: 6.5, 3: 5.0}  # 16 + 1, 4 + 3 + 1, 2 + 3.5 + 1, 4 + 1


@pytest.mark.slow
def test_zero3_two_ranks_holds_what_the_formula_says():
    width, depth = 512, 8
    results = run_stage(3, world=2, width=width, depth=depth, timeout=600)
    expected = formula_bytes_per_param(3, 2)
    for r in results:
        params = r["params"]
        assert params == depth * width * width
        held = r["held"]
        # Weights, fp32 state and EMA are exactly partitioned; gradients may also hold the
        # one layer still waiting in the reduce bucket when backward ends.
        for category in ("weights", "fp32_state", "ema"):
            assert held[category] == pytest.approx(expected[category] * params, rel=0.01)
        assert expected["grads"] * params <= held["grads"] <= (
            expected["grads"] * params + 2 * width * width + 64
        )
        measured = sum(held[c] for c in CATEGORIES)
        assert measured == pytest.approx(sum(expected.values()) * params, rel=0.15)
