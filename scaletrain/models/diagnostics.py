"""Training diagnostics the models record about themselves, behind a tiny API.

The trainer calls ``model.set_diagnostics(True)`` on the steps it wants to log, runs forward
and backward as usual, then ``model.pop_diagnostics()`` to get plain floats and clear them.
With diagnostics off nothing is recorded and the forward takes its normal fast path.

Keys (seed 001 § 5.1 step V for U-Nets; § 10.1 and § 12.1 for transformers):

* ``skip_ratio/level{l}``: U-Net, ||s'|| / ||d'|| of the skip and decoder streams entering
  the concatenations of resolution level l (0 = full resolution), after skip scaling; the
  mean over that level's merges.
* ``skip_grad_ratio/level{l}``: the same ratio for the gradients of s' and d' (available
  after backward; recorded by tensor hooks registered in forward).
* ``resid_update/block{i}``: MMDiT, ||h_{i+1} - h_i|| / ||h_i|| of the image stream.
* ``max_attn_logit``: the largest attention logit seen by any attention layer (on a
  subsample, see ``layers.Attention``).

Values are means over all forward (and backward) passes since the last pop, so gradient
accumulation over several micro-batches logs one average.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

from scaletrain.models.layers import Attention


class DiagnosticsMixin:
    """Mixed into the model classes (which are nn.Modules)."""

    diagnostics_enabled: bool = False
    _diag_values: dict[str, list[torch.Tensor]] = {}  # read-only default until first enabled

    def set_diagnostics(self, enabled: bool) -> None:
        if not enabled and not self.diagnostics_enabled:
            return  # already off and nothing recorded: the trainer calls this every step,
            # and walking every module to set an attribute cost 1% of a tiny model's step
        self.diagnostics_enabled = bool(enabled)
        for module in self._attention_modules():
            module.record_max_logit = self.diagnostics_enabled
        self._clear_diagnostics()

    def pop_diagnostics(self) -> dict[str, float]:
        means = {key: torch.stack(vals).float().mean() for key, vals in self._diag_values.items() if vals}
        logits = [m.max_logit for m in self._attention_modules() if m.max_logit is not None]
        if logits:
            means["max_attn_logit"] = torch.stack(logits).float().max()
        self._clear_diagnostics()
        if not means:
            return {}
        # One device->host transfer for everything.
        values = torch.stack([v.detach().to(torch.float32) for v in means.values()]).cpu().tolist()
        return dict(zip(means.keys(), values))

    # -- helpers for subclasses -------------------------------------------------------------

    def _record(self, key: str, value: torch.Tensor) -> None:
        self._diag_values[key].append(value.detach())

    def _clear_diagnostics(self) -> None:
        self._diag_values: dict[str, list[torch.Tensor]] = defaultdict(list)
        for module in self._attention_modules():
            module.max_logit = None

    def _attention_modules(self):
        assert isinstance(self, nn.Module)
        return [m for m in self.modules() if isinstance(m, Attention)]
