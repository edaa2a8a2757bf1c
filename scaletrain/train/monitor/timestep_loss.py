"""Loss per timestep bucket: where along the noise schedule the model is (not) learning.

The mean loss hides that diffusion training is many tasks at once; its per-timestep profile
is what loss weighting (min-SNR, EDM2's learned uncertainty) and timestep sampling
(logit-normal in SD3) reshape, so it is logged per bucket of normalised time t in [0, 1].

Sums and counts live in one tensor so that the loop reduces them across ranks with a single
collective (``all_reduce`` here, or ``reduce_(fn)`` with any in-place sum) before ``summary``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _bucket_label(i: int, n: int) -> str:
    # Enough decimals to tell edges apart: 10 buckets -> 0.1 steps, 4 -> 0.25, 3 -> 0.333.
    decimals = 1 if 10 % n == 0 else 2 if 100 % n == 0 else 3
    return f"{i / n:.{decimals}f}-{(i + 1) / n:.{decimals}f}"


class LossByTimestep:
    """Per-sample losses accumulated into ``num_buckets`` equal-width buckets of t in [0, 1]."""

    def __init__(self, num_buckets: int, prefix: str = "loss_t/") -> None:
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self.num_buckets = num_buckets
        self.prefix = prefix
        self.labels = [prefix + _bucket_label(i, num_buckets) for i in range(num_buckets)]
        # Row 0: loss sums, row 1: sample counts. float64 so long windows lose no precision.
        self.totals = torch.zeros(2, num_buckets, dtype=torch.float64)

    def add(self, t: torch.Tensor, per_sample_loss: torch.Tensor,
            where: torch.Tensor | None = None) -> None:
        """Add one batch: ``t`` normalised timesteps in [0, 1] and the loss of each sample.

        ``where`` (a bool tensor, 0-dim or per sample) leaves out what is False without a
        read-back to the host: the trainer passes whether the micro-batch's loss is finite.

        Discrete timesteps must be normalised first (t / (num_train_timesteps - 1)); a CPU
        ``t`` outside [0, 1] raises (on accelerators the check is skipped to avoid a sync).
        """
        t = t.detach().reshape(-1)
        loss = per_sample_loss.detach().reshape(-1)
        if t.shape != loss.shape:
            raise ValueError(f"t has {t.numel()} values but per_sample_loss {loss.numel()}")
        if t.device.type == "cpu" and t.numel() and (t.min() < 0 or t.max() > 1):
            raise ValueError(
                f"timesteps must be normalised to [0, 1], got range "
                f"[{t.min().item():.4g}, {t.max().item():.4g}]"
            )
        if self.totals.device != loss.device:
            self.totals = self.totals.to(loss.device)
        index = (t.to(torch.float64) * self.num_buckets).long().clamp_(0, self.num_buckets - 1)
        loss = loss.to(torch.float64)
        count = torch.ones_like(loss)
        if where is not None:
            keep = where.to(loss.device).expand_as(loss)
            loss = torch.where(keep, loss, 0.0)  # not loss * keep: NaN * 0 is NaN
            count = keep.to(torch.float64)
        self.totals[0].index_add_(0, index, loss)
        self.totals[1].index_add_(0, index, count)

    def reduce_(self, reduce_fn) -> None:
        """Apply an in-place sum across ranks to the totals, e.g. ``dist.all_reduce``."""
        reduce_fn(self.totals)

    def all_reduce(self, group=None) -> None:
        """Sum the totals over all ranks (no-op without an initialised process group).

        Must be called on every rank. With NCCL the totals are on the GPU already, as ``add``
        moves them to the device of the losses.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(self.totals, op=dist.ReduceOp.SUM, group=group)

    def summary(self, reset: bool = True) -> dict[str, float]:
        """Mean loss of every bucket that saw samples, keyed ``loss_t/0.0-0.1`` etc."""
        sums, counts = self.totals.cpu().tolist()
        out = {
            label: s / c for label, s, c in zip(self.labels, sums, counts, strict=True) if c > 0
        }
        if reset:
            self.reset()
        return out

    def reset(self) -> None:
        self.totals.zero_()
