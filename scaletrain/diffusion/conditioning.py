"""Conditioning: the cond dict, classifier-free-guidance dropout, null conditioning, model calls.

A cond dict holds the per-sample conditioning tensors a backbone consumes, under the loader's
batch keys: ``encoder_hidden_states`` (B, L, D), ``pooled`` (B, P) and ``time_ids`` (B, 6)
(SDXL micro-conditioning, Podell et al. 2023 sec. 2.2). Any of them may be absent (an MMDiT
has no time_ids).

There is no attention mask: the models attend to all L text positions, zero padding
included, as SDXL and SD3 do and as diffusers' pipelines run them, so what trains here is
what runs there. The padding is part of the conditioning; keep ``data.max_text_tokens``
fixed over a run (and, to fine-tune released weights, store the text as the released model
saw it).

CFG dropout (Ho & Salimans 2022) is applied here at train time, per sample and per step from
the objective's generator, so each epoch drops different samples and a seed replays it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

COND_KEYS = ("encoder_hidden_states", "pooled", "time_ids")
NULL_MODES = ("zeros", "empty_prompt")

ModelFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def cond_from_batch(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The conditioning entries of a loader batch (the keys of COND_KEYS it has)."""
    return {k: batch[k] for k in COND_KEYS if k in batch and batch[k] is not None}


# --------------------------------------------------------------------------- null conditioning


def _null_tokens(
    like: torch.Tensor, null_cond: Mapping[str, torch.Tensor] | None, mode: str
) -> torch.Tensor:
    """The null text tokens (L, D) shaped like one row of ``like`` (B, L, D).

    zeros: all-zero tokens. empty_prompt: the stored encoding of the empty caption, laid out
    as the loader lays out a caption: zero-padded to L, or cut to L."""
    _, length, dim = like.shape
    if mode == "zeros":
        return torch.zeros(length, dim, dtype=like.dtype, device=like.device)
    tokens = _require_null(null_cond, "encoder_hidden_states")
    if tokens.ndim == 3 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 2 or tokens.shape[1] != dim:
        raise ValueError(
            f"null_cond['encoder_hidden_states']: expected (L, {dim}) to match the batch's "
            f"encoder_hidden_states {tuple(like.shape)}, got {tuple(tokens.shape)}"
        )
    out = torch.zeros(length, dim, dtype=like.dtype, device=like.device)
    n = min(length, tokens.shape[0])
    out[:n] = tokens[:n].to(out)
    return out


def _null_pooled(
    like: torch.Tensor, null_cond: Mapping[str, torch.Tensor] | None, mode: str
) -> torch.Tensor:
    if mode == "zeros":
        return torch.zeros(like.shape[1:], dtype=like.dtype, device=like.device)
    pooled = _require_null(null_cond, "pooled").reshape(-1)
    if pooled.shape != like.shape[1:]:
        raise ValueError(
            f"null_cond['pooled']: expected {tuple(like.shape[1:])} to match the batch's pooled "
            f"{tuple(like.shape)}, got {tuple(pooled.shape)}"
        )
    return pooled.to(like)


def _require_null(null_cond: Mapping[str, torch.Tensor] | None, key: str) -> torch.Tensor:
    if null_cond is None or key not in null_cond:
        raise ValueError(
            f"cfg_null is 'empty_prompt' but no empty-prompt {key!r} was given: pass "
            f"null_cond={{'encoder_hidden_states': ..., 'pooled': ...}} to build_objective, or "
            f"put it in the batch as batch['null_cond'] (data: empty_prompt.text.safetensors)"
        )
    return null_cond[key]


def _replace_rows(x: torch.Tensor, rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """x with the rows where ``rows`` is True replaced by ``value`` (broadcast over rows)."""
    rows = rows.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.where(rows, value.unsqueeze(0).to(x.dtype), x)


def drop_conditioning(
    cond: Mapping[str, torch.Tensor],
    *,
    text: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    mode: str = "zeros",
    null_cond: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A copy of ``cond`` with the rows flagged in each bool [B] mask replaced by the null value
    (``mode`` zeros or empty_prompt). Missing keys are skipped. time_ids always become zeros
    (there is no "empty" micro-conditioning)."""
    if mode not in NULL_MODES:
        raise ValueError(f"unknown null conditioning {mode!r}; expected one of {NULL_MODES}")
    out = dict(cond)
    hidden = cond.get("encoder_hidden_states")
    if hidden is not None and bool(text.any()):
        out["encoder_hidden_states"] = _replace_rows(hidden, text,
                                                     _null_tokens(hidden, null_cond, mode))
    if cond.get("pooled") is not None and bool(pooled.any()):
        out["pooled"] = _replace_rows(
            cond["pooled"], pooled, _null_pooled(cond["pooled"], null_cond, mode)
        )
    ids = cond.get("time_ids")
    if ids is not None and bool(time_ids.any()):
        out["time_ids"] = _replace_rows(ids, time_ids, torch.zeros_like(ids[0]))
    return out


def make_uncond(
    cond: Mapping[str, torch.Tensor],
    mode: str = "zeros",
    null_cond: Mapping[str, torch.Tensor] | None = None,
    drop_time_ids: bool = False,
) -> dict[str, torch.Tensor]:
    """The unconditional counterpart of ``cond`` for CFG sampling, built exactly as training's
    prompt dropout builds it: text tokens and pooled embedding replaced for every row; the
    micro-conditioning kept (SDXL guides with the same time_ids) unless ``drop_time_ids``."""
    batch = _batch_size(cond)
    every = torch.ones(batch, dtype=torch.bool)
    return drop_conditioning(
        cond,
        text=every,
        pooled=every,
        time_ids=every if drop_time_ids else ~every,
        mode=mode,
        null_cond=null_cond,
    )


def _batch_size(cond: Mapping[str, torch.Tensor]) -> int:
    sizes = {v.shape[0] for v in cond.values()}
    if len(sizes) != 1:
        raise ValueError(f"cond entries disagree on batch size: {sorted(sizes)}")
    return sizes.pop()


@dataclass
class CFGDropout:
    """Train-time classifier-free-guidance dropout: each input dropped per sample with its own
    probability; ``prompt`` drops text and pooled together on top of their own draws."""

    prompt: float = 0.1
    text: float = 0.0
    pooled: float = 0.0
    time_ids: float = 0.0
    mode: str = "zeros"

    def draw(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Bool [B] masks of the dropped rows per input. Always draws B x 4 uniforms from
        ``generator`` whatever the probabilities, so the generator advances identically."""
        u = torch.rand(batch_size, 4, generator=generator, device=generator.device).cpu()
        prompt = u[:, 0] < self.prompt
        return {
            "text": prompt | (u[:, 1] < self.text),
            "pooled": prompt | (u[:, 2] < self.pooled),
            "time_ids": u[:, 3] < self.time_ids,
        }

    def __call__(
        self,
        cond: Mapping[str, torch.Tensor],
        generator: torch.Generator,
        null_cond: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(cond after dropout, the bool [B] masks of what was dropped)."""
        dropped = self.draw(_batch_size(cond), generator)
        out = drop_conditioning(cond, **dropped, mode=self.mode, null_cond=null_cond)
        return out, dropped


# --------------------------------------------------------------------------- model calls


def _unwrap(output: Any) -> torch.Tensor:
    """diffusers models return an output object (``.sample``) or a tuple; ours may return a
    tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"model returned {type(output).__name__}; expected a tensor")


def _need(cond: Mapping[str, torch.Tensor], key: str, arch: str) -> torch.Tensor:
    if cond.get(key) is None:
        raise KeyError(f"arch {arch!r} needs cond[{key!r}]; the batch has {sorted(cond)}")
    return cond[key]


def make_model_fn(model: Callable[..., Any], arch: str) -> ModelFn:
    """``model_fn(x_t, timestep, cond) -> prediction`` calling ``model`` with the diffusers
    argument names of its architecture (DESIGN.md, Interfaces):

    * ``unet``: model(sample, timestep, encoder_hidden_states,
      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}) (SDXL);
    * ``mmdit``: model(hidden_states, encoder_hidden_states, pooled_projections, timestep) (SD3);
    * ``toy``: model(sample, timestep, pooled_projections) (:mod:`scaletrain.models.toy`).
    """
    if arch == "unet":

        def unet_fn(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]):
            return _unwrap(
                model(
                    sample=x,
                    timestep=t,
                    encoder_hidden_states=_need(cond, "encoder_hidden_states", arch),
                    added_cond_kwargs={
                        "text_embeds": _need(cond, "pooled", arch),
                        "time_ids": _need(cond, "time_ids", arch),
                    },
                )
            )

        return unet_fn
    if arch == "mmdit":

        def mmdit_fn(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]):
            return _unwrap(
                model(
                    hidden_states=x,
                    encoder_hidden_states=_need(cond, "encoder_hidden_states", arch),
                    pooled_projections=_need(cond, "pooled", arch),
                    timestep=t,
                )
            )

        return mmdit_fn
    if arch == "toy":

        def toy_fn(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]):
            return _unwrap(model(sample=x, timestep=t,
                                 pooled_projections=_need(cond, "pooled", arch)))

        return toy_fn
    raise ValueError(f"unknown arch {arch!r}; expected 'unet', 'mmdit' or 'toy'")


def cast_inputs(model_fn: ModelFn, dtype: torch.dtype) -> ModelFn:
    """Wrap ``model_fn(x, t, cond)`` so the noisy input and floating conditioning reach the
    model in its working dtype (bf16 weights reject fp32 inputs). Timesteps stay fp32: the
    models embed them in fp32 before casting, and bf16 cannot hold t = 999 exactly."""
    if dtype == torch.float32:
        return model_fn

    def cast(v):
        return v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v

    def fn(x, t, cond):
        return model_fn(cast(x), t, {k: cast(v) for k, v in cond.items()})

    return fn
