"""Text encoders: captions -> hidden states (+ their lengths) and a pooled embedding.

``TextEncoder.encode(captions)`` returns CPU tensors in the storage dtype, batched:

* ``hidden_states`` (B, L, D) and ``lengths`` (B,): position i of sample b belongs to it for
  i < lengths[b] (the real token count, BOS/EOS included; or all ``max_length`` positions
  when ``trim_clip`` is off). Positions past a sample's length are zeros.
* ``pooled`` (B, P).
* SD3 only: ``t5_hidden_states`` (B, Lt, Dt) and ``t5_lengths`` (B,), the real T5 length.

:func:`unbatch_text` cuts that into the per-sample tensors a shard stores, each trimmed to its
length. The presets:

* ``sdxl`` (Podell et al. 2023, sec. 2.1): CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, the
  penultimate layer of each concatenated on channels (768 + 1280 = 2048), and the pooled,
  projected bigG embedding (1280).
* ``sd3`` (Esser et al. 2024, sec. 5.2): the same CLIP pair (2048 channels), pooled
  CLIP-L + bigG concatenated (768 + 1280 = 2048), and T5-XXL's last layer (4096) kept
  separate: the model pads and joins the sequences, so storage holds no padding.
* ``tiny_clip``: one tiny CLIP built locally (:mod:`scaletrain.data.encoders.tiny`), its
  final (normalised) layer and its projected pooled embedding, loaded by the same code.

T5 is bidirectional, so its states would depend on how much padding a batch had; it runs
with the attention mask, which makes a caption's states the same in any batch. CLIP is
causal: real positions never see padding either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from scaletrain.data.encoders.common import (
    DTYPE_NAMES,
    load_failure,
    quiet_hub_libraries,
    resolve_device,
    torch_dtype,
)
from scaletrain.data.encoders.tiny import ensure_tiny_clip
from scaletrain.data.preprocess.config import TextModelConfig

log = logging.getLogger(__name__)

PENULTIMATE = "penultimate"
LAST = "last"


@dataclass
class ComponentOutput:
    states: torch.Tensor  # (B, L, D), compute dtype, on the device
    lengths: torch.Tensor  # (B,) long, real token counts
    pooled: torch.Tensor | None  # (B, P) or None


class TransformersTextModel:
    """A transformers text encoder: CLIPTextModel(WithProjection) or T5EncoderModel."""

    def __init__(self, cfg, family: str, projection: bool, device, dtype) -> None:
        from transformers import AutoTokenizer  # heavy: imported when used

        # Quiet loads and one-line failures, as for the VAE (image.py).
        quiet_hub_libraries(("huggingface_hub", "transformers"))
        self.cfg = cfg
        self.family = family  # "clip" or "t5"
        self.device = device
        tok_src = cfg.tokenizer or cfg.name
        tok_kwargs = {"subfolder": cfg.tokenizer_subfolder} if cfg.tokenizer_subfolder else {}
        model_kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_src, **tok_kwargs)
            model_cls = self._model_class(family, projection)
            model = model_cls.from_pretrained(cfg.name, torch_dtype=dtype, **model_kwargs)
        except Exception as exc:  # noqa: BLE001 - the hub client's errors are of many kinds
            raise load_failure(f"{family} text encoder", cfg.name, cfg.subfolder, exc) from exc
        self.model = model.to(device).eval().requires_grad_(False)
        self.projection = projection
        self.max_length = min(cfg.max_length, self._model_max_length())
        config = self.model.config
        self.width = int(config.hidden_size if family == "clip" else config.d_model)
        self.pooled_dim = int(config.projection_dim) if projection else self.width

    @staticmethod
    def _model_class(family: str, projection: bool):
        import transformers  # heavy: imported when used

        if family == "t5":
            return transformers.T5EncoderModel
        return (
            transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
        )

    def _model_max_length(self) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return int(limit) if limit else self.cfg.max_length

    @torch.no_grad()
    def __call__(self, captions: list[str], layer: str, full_length: bool) -> ComponentOutput:
        tokens = self.tokenizer(
            captions,
            padding="max_length" if full_length else "longest",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        if layer == PENULTIMATE:
            states = out.hidden_states[-2]
        else:
            states = out.last_hidden_state
        pooled = None
        if self.family == "clip":
            pooled = out.text_embeds if self.projection else out.pooler_output
        return ComponentOutput(states, mask.sum(1).long(), pooled)

    def identity(self) -> dict[str, Any]:
        return {
            "library": "transformers",
            "class": type(self.model).__name__,
            "name": self.cfg.name,
            "subfolder": self.cfg.subfolder,
            "tokenizer": self.cfg.tokenizer or self.cfg.name,
            "max_length": self.max_length,
        }


class OpenClipTextModel:
    """The text tower of an open_clip CLIP (its vision tower is dropped after loading)."""

    def __init__(self, cfg, device, dtype) -> None:
        import open_clip  # heavy (~6 s): imported when an open_clip tower is used

        self.cfg = cfg
        self.device = device
        if cfg.model_config:
            open_clip.add_model_config(cfg.model_config)
        try:
            model = open_clip.create_model(cfg.name, pretrained=cfg.pretrained, device="cpu")
            self.tokenizer = open_clip.get_tokenizer(cfg.name)
        except (OSError, RuntimeError, ValueError) as exc:
            raise OSError(
                f"cannot load open_clip text encoder {cfg.name!r} "
                f"(pretrained={cfg.pretrained!r}): {exc}"
            ) from exc
        if hasattr(model, "visual"):
            model.visual = None  # only the text tower runs; free the vision weights
        self.model = model.to(device, dtype).eval().requires_grad_(False)
        self.layers = len(self.model.transformer.resblocks)
        self.width = int(self.model.transformer.width)
        proj = self.model.text_projection
        if proj is None:
            self.pooled_dim = self.width
        elif isinstance(proj, torch.nn.Linear):
            self.pooled_dim = int(proj.out_features)
        else:
            self.pooled_dim = int(proj.shape[1])
        self.context_length = int(self.model.context_length)
        self.eot_id = getattr(self.tokenizer, "eot_token_id", None)

    @torch.no_grad()
    def __call__(self, captions: list[str], layer: str, full_length: bool) -> ComponentOutput:
        ids = self.tokenizer(captions, context_length=self.context_length).to(self.device)
        if self.eot_id is not None:
            # Real length = up to and including the first end-of-text token.
            lengths = (ids == self.eot_id).int().argmax(dim=1) + 1
        else:
            lengths = (ids != 0).sum(dim=1)
        index = self.layers - 2 if layer == PENULTIMATE else self.layers - 1
        out = self.model.forward_intermediates(
            text=ids, text_indices=[index], normalize=False, text_output_fmt="NLC"
        )
        states = out["text_intermediates"][0]
        if layer == LAST:
            states = self.model.ln_final(states)
        # text_features: ln_final at the EOT token, times the text projection (unnormalised):
        # SDXL's "pooled" text embedding.
        return ComponentOutput(states, lengths.long(), out["text_features"])

    def identity(self) -> dict[str, Any]:
        return {
            "library": "open_clip",
            "name": self.cfg.name,
            "pretrained": self.cfg.pretrained,
            "model_config": self.cfg.model_config,
            "max_length": self.context_length,
        }


def _load(cfg, family: str, projection: bool, device, dtype):
    if cfg.library == "open_clip":
        if family != "clip":
            raise ValueError(f"{cfg.name}: open_clip can only load CLIP text towers")
        return OpenClipTextModel(cfg, device, dtype)
    return TransformersTextModel(cfg, family, projection, device, dtype)


class TextEncoder:
    """A preset's text encoders behind one ``encode(captions)``."""

    def __init__(self, cfg, device: str | torch.device | None = "auto") -> None:
        self.cfg = cfg
        self.preset = cfg.preset
        self.device = resolve_device(device)
        compute = torch_dtype(cfg.compute_dtype)
        self.store_dtype = torch_dtype(cfg.dtype)
        self.full_length = not cfg.trim_clip
        self.clip_l = self.clip_g = self.t5 = self.tiny = None
        if self.preset == "tiny_clip":
            # Built and saved on first use, then loaded like any transformers CLIP.
            path = ensure_tiny_clip(cfg.tiny)
            tiny_cfg = TextModelConfig(name=str(path), max_length=cfg.tiny.max_length)
            self.tiny = TransformersTextModel(tiny_cfg, "clip", True, self.device, compute)
            self.hidden_dim, self.pooled_dim = self.tiny.width, self.tiny.pooled_dim
            self.t5_dim = None
        elif self.preset in ("sdxl", "sd3"):
            sd3 = self.preset == "sd3"
            self.clip_l = _load(cfg.clip_l, "clip", sd3, self.device, compute)
            self.clip_g = _load(cfg.clip_g, "clip", True, self.device, compute)
            self.hidden_dim = self.clip_l.width + self.clip_g.width
            if sd3:
                self.t5 = _load(cfg.t5, "t5", False, self.device, compute)
                self.pooled_dim = self.clip_l.pooled_dim + self.clip_g.pooled_dim
                self.t5_dim = self.t5.width
            else:
                self.pooled_dim, self.t5_dim = self.clip_g.pooled_dim, None
        else:
            raise ValueError(f"unknown text encoder preset {self.preset!r}")

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if not captions:
            raise ValueError("encode() needs at least one caption")
        captions = list(captions)
        if self.tiny is not None:
            out = self.tiny(captions, LAST, self.full_length)
            states, lengths, pooled = out.states, out.lengths, out.pooled
        else:
            a = self.clip_l(captions, PENULTIMATE, self.full_length)
            b = self.clip_g(captions, PENULTIMATE, self.full_length)
            # The two CLIPs share OpenAI's BPE, so their lengths agree for real models; the
            # max keeps every real token of either if a custom pair does not.
            lengths = torch.maximum(a.lengths, b.lengths)
            width = (
                int(lengths.max())
                if not self.full_length
                else max(a.states.shape[1], b.states.shape[1])
            )
            states = torch.cat([_fit(a.states, width), _fit(b.states, width)], dim=-1)
            pooled = b.pooled if self.t5 is None else torch.cat([a.pooled, b.pooled], dim=-1)
        if self.full_length:
            lengths = torch.full_like(lengths, states.shape[1])
        result = {
            "hidden_states": _zero_past(states, lengths),
            "lengths": lengths.cpu(),
            "pooled": pooled,
        }
        if self.t5 is not None:
            t5 = self.t5(captions, LAST, full_length=False)
            result["t5_hidden_states"] = _zero_past(t5.states, t5.lengths)
            result["t5_lengths"] = t5.lengths.cpu()
        return {
            k: v.to("cpu", self.store_dtype) if v.is_floating_point() else v.cpu()
            for k, v in result.items()
        }

    def identity(self) -> dict[str, Any]:
        parts = {
            name: comp.identity()
            for name, comp in (
                ("clip_l", self.clip_l),
                ("clip_g", self.clip_g),
                ("t5", self.t5),
                ("tiny", self.tiny),
            )
            if comp is not None
        }
        return {
            "preset": self.preset,
            "components": parts,
            "dtype": DTYPE_NAMES[self.store_dtype],
            "compute_dtype": self.cfg.compute_dtype,
            "hidden_dim": self.hidden_dim,
            "pooled_dim": self.pooled_dim,
            "t5_dim": self.t5_dim,
            "trim_clip": self.cfg.trim_clip,
        }


def _fit(states: torch.Tensor, length: int) -> torch.Tensor:
    """Cut or zero-pad the sequence dimension to ``length``."""
    if states.shape[1] >= length:
        return states[:, :length]
    pad = states.new_zeros(states.shape[0], length - states.shape[1], states.shape[2])
    return torch.cat([states, pad], dim=1)


def _zero_past(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(states.shape[1], device=states.device)
    keep = positions[None, :] < lengths.to(states.device)[:, None]
    return states * keep[:, :, None].to(states.dtype)


def unbatch_text(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per-sample shard tensors from ``TextEncoder.encode`` output, trimmed to length."""
    out = []
    for i in range(batch["hidden_states"].shape[0]):
        n = int(batch["lengths"][i])
        sample = {
            "hidden_states": batch["hidden_states"][i, :n].clone(),
            "pooled": batch["pooled"][i].clone(),
        }
        if "t5_hidden_states" in batch:
            m = int(batch["t5_lengths"][i])
            sample["t5_hidden_states"] = batch["t5_hidden_states"][i, :m].clone()
        out.append(sample)
    return out
