"""Diagnostics schedule and the glue to models exposing set/pop_diagnostics."""

import torch
from torch import nn

from scaletrain.train.monitor.diagnostics import (
    DiagnosticsSchedule,
    diagnostics_metrics,
    pop_model_diagnostics,
    set_model_diagnostics,
)


class _ModelWithDiagnostics(nn.Module):
    """Implements the models' diagnostics protocol: a ratio recorded during forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.enabled = False
        self.stats = {}

    def set_diagnostics(self, enabled):
        self.enabled = enabled

    def pop_diagnostics(self):
        stats, self.stats = self.stats, {}
        return stats

    def forward(self, x):
        y = self.lin(x)
        if self.enabled:
            self.stats["resid_update/block0"] = (y.norm() / x.norm()).detach()
        return y


class _Wrapper(nn.Module):  # stands in for a DeepSpeed engine's `.module`
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_schedule():
    schedule = DiagnosticsSchedule(5)
    assert [s for s in range(12) if schedule.should_collect(s)] == [0, 5, 10]
    assert not any(DiagnosticsSchedule(0).should_collect(s) for s in range(10))


def test_collect_through_wrapper_and_prefix():
    model = _ModelWithDiagnostics()
    wrapped = _Wrapper(model)
    assert set_model_diagnostics(wrapped, True)
    model(torch.ones(1, 2))
    metrics = diagnostics_metrics(pop_model_diagnostics(wrapped))
    assert list(metrics) == ["diag/resid_update/block0"]
    assert isinstance(metrics["diag/resid_update/block0"], float)
    assert pop_model_diagnostics(wrapped) == {}


def test_model_without_diagnostics_is_tolerated():
    assert not set_model_diagnostics(nn.Linear(2, 2), True)
    assert pop_model_diagnostics(nn.Linear(2, 2)) == {}
