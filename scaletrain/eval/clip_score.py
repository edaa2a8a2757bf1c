"""CLIP score (Hessel et al. 2021): how well an image matches its prompt.

    score(image, prompt) = 100 * max(cos(E_image, E_text), 0)

with E the CLIP model's projected embeddings (the scale 100 as torchmetrics' CLIPScore; the
paper's w = 2.5 is a rescaling of the same number). The model is an open_clip CLIP (a
built-in name with a pretrained tag or weights file, ``hf-hub:ORG/REPO`` or
``local-dir:PATH``) or a transformers ``CLIPModel`` (a hub id or a local directory), each
with its own image preprocessing (resize, centre crop, normalise) applied to the 8-bit
image, i.e. to what ``scaletrain sample`` would save. Prompts longer than the model's
context are truncated, as CLIP was trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image


class ClipScorer:
    """``scores(images, prompts)`` -> [B] float64 CLIP scores (CPU)."""

    def __init__(self, model: str, library: str = "transformers", pretrained: str = "",
                 device: torch.device | str = "cpu") -> None:
        self.name, self.library, self.pretrained = model, library, pretrained
        self.device = torch.device(device)
        if library == "open_clip":
            self._load_open_clip()
        elif library == "transformers":
            self._load_transformers()
        else:
            raise ValueError(f"CLIP library {library!r}: use open_clip or transformers")
        self.model = self.model.to(self.device).eval().requires_grad_(False)

    def _load_open_clip(self) -> None:
        import open_clip  # heavy (~6 s): imported where the model is built

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.name, pretrained=self.pretrained or None, device="cpu")
            self.tokenizer = open_clip.get_tokenizer(self.name)
        except Exception as exc:  # noqa: BLE001 - missing files, hub access, bad configs
            raise OSError(f"cannot load open_clip CLIP {self.name!r} "
                          f"(pretrained={self.pretrained!r}): {exc}") from exc
        self.model, self.preprocess = model, preprocess

    def _load_transformers(self) -> None:
        from transformers import AutoProcessor, CLIPModel  # heavy: imported where built

        try:
            self.model = CLIPModel.from_pretrained(self.name)
            self.processor = AutoProcessor.from_pretrained(self.name)
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot load transformers CLIPModel {self.name!r}: {exc}") from exc

    @property
    def identity(self) -> dict[str, str]:
        return {"model": self.name, "library": self.library, "pretrained": self.pretrained}

    @torch.no_grad()
    def embeddings(self, images: Sequence[Image.Image],
                   prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm image and text embeddings, float32 on the CPU."""
        if self.library == "open_clip":
            pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device)
            image = self.model.encode_image(pixels)
            text = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))
        else:
            inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt",
                                    padding=True, truncation=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            image = _pooled(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
            text = _pooled(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                        attention_mask=inputs["attention_mask"]))
        image = torch.nn.functional.normalize(image.float(), dim=-1)
        text = torch.nn.functional.normalize(text.float(), dim=-1)
        return image.cpu(), text.cpu()

    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        image, text = self.embeddings(images, prompts)
        cos = (image.double() * text.double()).sum(dim=-1)
        return 100.0 * cos.clamp(min=0)


def _pooled(out) -> torch.Tensor:
    """transformers >= 5 returns a model output whose pooler_output is the projected
    embedding; older versions return the tensor itself."""
    return out.pooler_output if hasattr(out, "pooler_output") else out
