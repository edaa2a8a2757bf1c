"""Validation loss on held-out latents: the MLPerf text-to-image protocol.

Fixed held-out samples (:mod:`.heldout`), fixed process times t_k = (k + 0.5) / K
(``eval.timesteps``), fixed noise per (sample, timestep) (:func:`.heldout.noise_for`), no
CFG dropout: every evaluation measures the same quantity, so the curve moves only with the
weights, and a run resumed at another world size continues the same curve. The value is the
plain MSE against the objective's target (eps, v, x0 or the flow velocity), unweighted, so
runs with different loss weightings compare; ``Objective.loss_at`` computes it, the same
noising and model call as training.

Every rank runs its share of the global batches (:mod:`.sharing`); the per-(sample, timestep)
losses are assembled exactly and reduced in one order, so the numbers do not depend on the
world size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from scaletrain.diffusion.conditioning import cond_from_batch
from scaletrain.diffusion.objectives import Objective
from scaletrain.eval.heldout import HeldOutSet, noise_for
from scaletrain.eval.sharing import Share, assemble_rows


def timestep_label(t: float) -> str:
    return f"{t:.3f}"


@torch.no_grad()
def validation_loss(
    objective: Objective,
    model_fn: Callable,
    heldout: HeldOutSet,
    batches: list[list[int]],
    share: Share,
    unit_timesteps: list[float],
    seed: int,
    device: torch.device,
) -> dict[str, float]:
    """``{"loss": mean, "loss_t/0.062": ..., "samples": N}`` over the held-out samples of
    ``batches`` (this rank runs ``share``). A collective: every rank calls it."""
    n = sum(len(b) for b in batches)
    rows, owned = [], []
    for batch in share.batches:
        rows.append(_batch_losses(objective, model_fn, heldout, batch, unit_timesteps, seed,
                                  device))
        owned += batch
    for _ in range(share.padding):  # keep every rank's model calls in step (ZeRO-3)
        _batch_losses(objective, model_fn, heldout, batches[0], unit_timesteps, seed, device)
    local = torch.cat(rows) if rows else torch.zeros(0, len(unit_timesteps), dtype=torch.float64)
    table = assemble_rows(n, owned, local, device)  # [N, K] float64, same on every rank
    per_t = table.mean(dim=0)
    out = {"loss": float(per_t.mean()), "samples": n}
    out.update({f"loss_t/{timestep_label(t)}": float(v) for t, v in zip(unit_timesteps, per_t)})
    return out


def _batch_losses(objective, model_fn, heldout, batch, unit_timesteps, seed, device):
    data = heldout.collate(batch)
    x0 = data["latents"].to(device)
    cond = {k: v.to(device) for k, v in cond_from_batch(data).items()}
    columns = []
    for k, t in enumerate(unit_timesteps):
        points = objective.points_at(torch.full((len(batch),), t, dtype=torch.float64))
        eps = torch.stack([noise_for(i, k, seed, tuple(x0.shape[1:])) for i in batch])
        mse, _ = objective.loss_at(model_fn, x0, cond, points, eps.to(device))
        columns.append(mse.double().cpu())
    return torch.stack(columns, dim=1)  # [B, K]
