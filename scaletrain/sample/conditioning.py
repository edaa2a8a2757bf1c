"""Prompts -> the conditioning dict a model was trained on, built exactly as training built it.

Text goes through the run's own text encoder (``scaletrain.data.encoders.build_text_encoder``),
is cut per prompt as a shard stores it (``unbatch_text``), and padded into the loader's batch
layout (``text_context``: CLIP then T5 tokens, zero padding to ``data.max_text_tokens``), so
a prompt reaches the model as its caption did in training. U-Nets also get SDXL's
micro-conditioning (Podell et al. 2023, sec. 2.2) for an uncropped image of the target size:
``time_ids = (h, w, 0, 0, h, w)`` in pixels.

The unconditional branch of classifier-free guidance (Ho & Salimans 2022) is what training's
prompt dropout put in place of a caption (``diffusion.cfg_null``): the empty prompt's encoding
(``empty_prompt``) or zeros (``zeros``); a negative prompt replaces it when given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scaletrain.data.encoders import build_text_encoder, unbatch_text
from scaletrain.data.loader.batching import text_context
from scaletrain.diffusion.conditioning import make_uncond


class PromptConditioner:
    """``cond(prompts, height, width)`` and ``uncond(cond, negative)`` for one model.

    Each distinct prompt is encoded once. ``release_encoder(prompts)`` encodes what will be
    needed and then drops the text encoder (a training run's validation keeps a few prompts,
    not several GB of text encoders, for its whole length)."""

    def __init__(
        self,
        preprocess,
        max_text_tokens: int,
        arch: str,
        cfg_null: str = "zeros",
        device: str | torch.device | None = "cpu",
    ) -> None:
        self.encoder = build_text_encoder(preprocess, device=device)
        self.max_text_tokens = int(max_text_tokens)
        self.arch = arch
        self.cfg_null = cfg_null
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def text(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` (B, L, D) and ``pooled`` (B, P), float32 on the CPU; each
        distinct prompt is encoded once."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            if self.encoder is None:
                raise ValueError(f"prompt {todo[0]!r} was not encoded before the text encoder "
                                 "was released")
            # One prompt per encoder call: a batched GEMM may round a row differently with
            # other rows beside it (CPU BLAS picks kernels by batch size), and an image must
            # depend on its own prompt only, not on which prompts were encoded with it
            # (validation encodes all of its prompts at once, `scaletrain sample` one list).
            for prompt in todo:
                (record,) = unbatch_text(self.encoder.encode([prompt]))
                self._cache[prompt] = text_context(record, self.max_text_tokens)
        rows = [self._cache[p] for p in prompts]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def release_encoder(self, prompts: Sequence[str] = ()) -> None:
        """Encode ``prompts`` (and the empty prompt, the guidance baseline), then free the
        text encoder; later calls may only use prompts encoded by then."""
        self.text([*prompts, ""])
        self.encoder = None

    def time_ids(self, batch: int, height: int, width: int) -> torch.Tensor:
        row = [float(height), float(width), 0.0, 0.0, float(height), float(width)]
        return torch.tensor([row] * batch, dtype=torch.float32)

    def cond(self, prompts: Sequence[str], height: int, width: int) -> dict[str, torch.Tensor]:
        cond = self.text(prompts)
        if self.arch == "unet":
            cond["time_ids"] = self.time_ids(len(prompts), height, width)
        return cond

    def uncond(
        self, cond: dict[str, torch.Tensor], negative_prompt: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The guidance baseline for ``cond``'s rows (time_ids kept, as SDXL guides)."""
        batch = cond["pooled"].shape[0]
        if negative_prompt is not None:
            out = self.text([negative_prompt] * batch)
            if "time_ids" in cond:
                out["time_ids"] = cond["time_ids"]
            return out
        null = self.text([""])
        null = {k: v[0] for k, v in null.items()}
        return make_uncond(cond, self.cfg_null, null_cond=null)

    def check_model(self, model_cfg) -> None:
        """The encoder's widths must be the model's (a clear error instead of a shape error)."""
        hidden = max(self.encoder.hidden_dim, self.encoder.t5_dim or 0)
        if self.arch == "unet":
            want_hidden, key = model_cfg.cross_attention_dim, "model.cross_attention_dim"
        else:
            want_hidden, key = model_cfg.joint_attention_dim, "model.joint_attention_dim"
        if hidden != want_hidden:
            raise ValueError(
                f"the text encoder (preset {self.encoder.preset!r}) gives {hidden}-wide states "
                f"but {key} is {want_hidden}; pass the encoders the model was trained with "
                "(--encoders YAML)"
            )
        if self.encoder.pooled_dim != model_cfg.pooled_projection_dim:
            raise ValueError(
                f"the text encoder (preset {self.encoder.preset!r}) gives a "
                f"{self.encoder.pooled_dim}-wide pooled embedding but "
                f"model.pooled_projection_dim is {model_cfg.pooled_projection_dim}; pass the "
                "encoders the model was trained with (--encoders YAML)"
            )
