"""Decode latent-shard samples and assemble them into a training batch.

Batch keys (B = batch size, L = max_text_tokens):

* ``latents_mean``, ``latents_std`` (B, C, H, W) in their stored dtype, with the floats
  ``latent_scaling_factor`` and ``latent_shift_factor`` (the VAE's config): the training step
  draws ``z = mean + std * eps`` on its device with its own generator and normalises it
  (``scaletrain.diffusion.latents.draw_latents``; Rombach et al. 2022, sec. 3: a fresh draw of
  the posterior each time a sample is seen). Drawing there rather than here halves the
  loader's work per sample and keeps the draw on the GPU.
* ``latents`` (B, C, H, W) float32 instead, with ``sample_latents=False``: the normalised
  mean ``(mean - shift) * scale`` (held-out evaluation uses it).
* ``encoder_hidden_states`` (B, L, D) float32, zero-padded (no mask: the models attend to
  every position, see scaletrain.diffusion.conditioning). SD3-style data (``t5_hidden_states`` stored) becomes the
  MMDiT context as SD3 builds it (Esser et al. 2024, sec. 5.2): the CLIP states zero-padded on
  channels to the T5 width, then the T5 states appended along the sequence. Samples are stored
  trimmed to their real tokens, so the real tokens are packed (CLIP then T5) before the padding.
* ``pooled`` (B, P) float32, ``time_ids`` (B, 6) float32: original_size (h, w),
  crop_top_left (top, left), target_size (h, w), SDXL's micro-conditioning (Podell et al. 2023,
  sec. 2.2).
* ``keys`` list[str] and ``epochs`` list[int] (the epoch each sample belongs to).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scaletrain.data.loader.tensor_view import load_tensors_view
from scaletrain.data.loader.validate import (
    BadSample,
    check_declared,
    check_finite,
    check_meta_numbers,
    verify_members,
)
from scaletrain.data.shard_format import LATENT_EXT, META_EXT, TEXT_EXT, bucket_name


@dataclass(frozen=True)
class SampleChecks:
    """What each sample is validated against beyond its dims (:mod:`.validate`): the
    dataset's declared latent dtype and the VAE's downsampling factor (None: not checked)."""

    latent_dtype: str | None = None
    downsample: int | None = None


@dataclass(frozen=True)
class SampleSchema:
    """The dims every sample of a dataset shares (taken from its first sample)."""

    latent_channels: int
    text_dim: int
    pooled_dim: int
    t5_dim: int | None

    def check(
        self,
        key: str,
        mean: torch.Tensor,
        hidden: torch.Tensor,
        pooled: torch.Tensor,
        t5: torch.Tensor | None,
    ) -> None:
        got = SampleSchema(
            mean.shape[0], hidden.shape[1], pooled.shape[0], None if t5 is None else t5.shape[1]
        )
        if got != self:
            raise BadSample(f"sample {key!r}: dims {got} differ from the dataset's {self}")


@dataclass
class PendingSample:
    """A parsed sample waiting in its bucket, tensors still in their stored dtype."""

    key: str
    epoch: int
    shard_id: int
    position: int
    mean: torch.Tensor
    std: torch.Tensor
    hidden_states: torch.Tensor
    pooled: torch.Tensor
    t5_hidden_states: torch.Tensor | None
    time_ids: tuple[float, ...]
    group: tuple[str, tuple[int, ...]]

    def detach(self) -> None:
        """Copy the tensors out of the shard's memory map, so that a sample carried for long
        in a bucket does not keep its whole shard mapped (and a file descriptor open)."""
        self.mean, self.std = self.mean.clone(), self.std.clone()
        self.hidden_states, self.pooled = self.hidden_states.clone(), self.pooled.clone()
        if self.t5_hidden_states is not None:
            self.t5_hidden_states = self.t5_hidden_states.clone()


def _pair(meta: dict, name: str, key: str) -> list[float]:
    return check_meta_numbers(key, name, meta.get(name))


def parse_sample(
    key: str,
    files: dict[str, memoryview],
    epoch: int,
    shard_id: int,
    position: int,
    schema: SampleSchema | None = None,
    checks: SampleChecks | None = None,
    checksums: dict[str, int] | None = None,
    computed: dict[str, int] | None = None,
) -> PendingSample:
    """Decode one raw sample (shard_format's layout) and check what batching relies on:
    member checksums (when the manifest has them), dims, declared dtype and shape, finite
    values, metadata. Any failure raises BadSample.

    Tensors are zero-copy views into ``files``' buffers, in their stored dtype."""
    missing = [ext for ext in (LATENT_EXT, TEXT_EXT, META_EXT) if ext not in files]
    if missing:
        raise BadSample(f"sample {key!r}: lacks {', '.join(missing)}")
    if checksums is not None:
        verify_members(key, files, checksums, computed)
    try:
        latent = load_tensors_view(files[LATENT_EXT])
        text = load_tensors_view(files[TEXT_EXT])
        meta = json.loads(bytes(files[META_EXT]))
    except Exception as exc:
        raise BadSample(f"sample {key!r}: cannot decode: {exc}") from exc
    mean, std = latent.get("mean"), latent.get("std")
    if mean is None or std is None or mean.dim() != 3 or mean.shape != std.shape:
        raise BadSample(f"sample {key!r}: latent needs 'mean' and 'std' of one (C, h, w) shape")
    hidden, pooled = text.get("hidden_states"), text.get("pooled")
    if hidden is None or hidden.dim() != 2 or pooled is None or pooled.dim() != 1:
        raise BadSample(f"sample {key!r}: text needs 'hidden_states' (L, D) and 'pooled' (P,)")
    t5 = text.get("t5_hidden_states")
    if t5 is not None and t5.dim() != 2:
        raise BadSample(f"sample {key!r}: 't5_hidden_states' must be (L, D)")
    if not isinstance(meta, dict):
        raise BadSample(f"sample {key!r}: meta must be a JSON object")
    if schema is not None:
        schema.check(key, mean, hidden, pooled, t5)
    bucket = meta.get("bucket")
    if checks is not None:
        dtype = getattr(torch, checks.latent_dtype) if checks.latent_dtype else None
        check_declared(key, mean, std, bucket, dtype, checks.downsample)
    check_finite(key, {"latent mean": mean, "latent std": std, "hidden_states": hidden,
                       "pooled": pooled, "t5_hidden_states": t5})
    time_ids = (
        *_pair(meta, "original_size", key),
        *_pair(meta, "crop_top_left", key),
        *_pair(meta, "target_size", key),
    )
    name = bucket_name(*bucket) if isinstance(bucket, (list, tuple)) and len(bucket) == 2 else "?"
    # Group on the latent shape too: whatever the metadata says, a batch must stack.
    group = (name, tuple(mean.shape))
    return PendingSample(
        key, epoch, shard_id, position, mean, std, hidden, pooled, t5, time_ids, group
    )


def assemble_text(
    hidden: Sequence[torch.Tensor], t5: Sequence[torch.Tensor] | None, max_tokens: int
) -> tuple[torch.Tensor, int]:
    """Pad (and for SD3-style data, join) text states: (B, L, D) float32, and how many samples
    had to be truncated to ``max_tokens``."""
    widths = {h.shape[1] for h in hidden}
    t5_widths = {t.shape[1] for t in t5} if t5 is not None else set()
    if len(widths) > 1 or len(t5_widths) > 1:
        raise BadSample(f"text widths differ within a batch: {sorted(widths | t5_widths)}")
    width = max(widths | t5_widths)
    batch = len(hidden)
    # Only the padding is zeroed: the real rows are overwritten anyway.
    context = torch.empty(batch, max_tokens, width, dtype=torch.float32)
    truncated = 0
    for i, h in enumerate(hidden):
        n = min(h.shape[0], max_tokens)
        context[i, :n, : h.shape[1]] = h[:n]
        total = n
        wanted = h.shape[0]
        if t5 is not None:
            t = t5[i]
            m = min(t.shape[0], max_tokens - n)
            context[i, n : n + m, : t.shape[1]] = t[:m]
            total += m
            wanted += t.shape[0]
        if width > h.shape[1]:
            context[i, :n, h.shape[1] :] = 0
        if t5 is not None and width > t5[i].shape[1]:
            context[i, n:total, t5[i].shape[1] :] = 0
        context[i, total:] = 0
        truncated += wanted > max_tokens
    return context, truncated


def text_context(text: dict[str, torch.Tensor], max_tokens: int) -> dict[str, torch.Tensor]:
    """One text record (e.g. the empty prompt) in the batch layout, without the batch dim."""
    t5 = text.get("t5_hidden_states")
    context, _ = assemble_text(
        [text["hidden_states"]], [t5] if t5 is not None else None, max_tokens
    )
    return {"encoder_hidden_states": context[0], "pooled": text["pooled"].float()}


def collate(
    samples: Sequence[PendingSample],
    scaling_factor: float,
    shift_factor: float,
    max_tokens: int,
    sample_latents: bool,
) -> dict:
    """The batch dict of samples that share one group (bucket and latent shape)."""
    if sample_latents:
        # Stored dtype, one copy: the draw and normalisation happen in the training step.
        latents = {
            "latents_mean": torch.stack([s.mean for s in samples]),
            "latents_std": torch.stack([s.std for s in samples]),
            "latent_scaling_factor": float(scaling_factor),
            "latent_shift_factor": float(shift_factor),
        }
    else:
        mean = torch.empty((len(samples), *samples[0].mean.shape), dtype=torch.float32)
        for i, s in enumerate(samples):
            mean[i].copy_(s.mean)
        if shift_factor:
            mean.sub_(shift_factor)
        mean.mul_(scaling_factor)
        latents = {"latents": mean}

    with_t5 = [s.t5_hidden_states is not None for s in samples]
    if any(with_t5) and not all(with_t5):
        raise BadSample("some samples of a batch have t5_hidden_states and others not")
    context, truncated = assemble_text(
        [s.hidden_states for s in samples],
        [s.t5_hidden_states for s in samples] if all(with_t5) else None,
        max_tokens,
    )
    pooled_widths = {s.pooled.shape[0] for s in samples}
    if len(pooled_widths) > 1:
        raise BadSample(f"pooled widths differ within a batch: {sorted(pooled_widths)}")
    return {
        **latents,
        "encoder_hidden_states": context,
        "pooled": torch.stack([s.pooled for s in samples]).float(),
        "time_ids": torch.tensor([s.time_ids for s in samples], dtype=torch.float32),
        "keys": [s.key for s in samples],
        "epochs": [s.epoch for s in samples],
        "__truncated__": truncated,
    }
