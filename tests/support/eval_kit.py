"""Stand-ins for the networks evaluation loads, built and saved the way the real ones are.

* :func:`random_inception_weights`: pytorch-fid's FID Inception (torchvision's Inception3 with
  pytorch-fid's patched blocks, 1008 classes, no aux head: the layout of
  ``pt_inception-2015-12-05-6726825d.pth``) with random weights, saved as a state dict. Its
  batch-norm statistics are set from one batch of noise images, so every layer's activations
  have unit scale and the pool features of different images differ (with the running
  statistics of a fresh module, 0 and 1, activations shrink through the ~90 layers).
* :func:`tiny_transformers_clip`: a tiny transformers CLIPModel with tokenizer and image
  processor, saved with save_pretrained (the tiny open_clip CLIP is the product's own
  :func:`scaletrain.data.encoders.tiny.save_tiny_open_clip`).
* :func:`image_folder`: small PNGs with structure (gradients, blobs) and a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_fid.inception import (
    FIDInceptionA,
    FIDInceptionC,
    FIDInceptionE_1,
    FIDInceptionE_2,
    _inception_v3,
)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's own file name


def fid_inception_structure() -> torch.nn.Module:
    """The module pytorch_fid.inception.fid_inception_v3 builds, before it loads weights."""
    inception = _inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = FIDInceptionE_1(1280)
    inception.Mixed_7c = FIDInceptionE_2(2048)
    return inception


def random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = fid_inception_structure()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 299, 299) * 2 - 1)  # the [-1, 1] range InceptionV3 feeds it
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.eval().state_dict(), path)
    return path


def image_folder(root: str | Path, count: int, size: int = 32, seed: int = 0,
                 tint: float = 0.0) -> Path:
    """``count`` RGB PNGs named 000.png ...; ``tint`` shifts their colours (another set)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        c = rng.uniform(0, 1, (3, 3))
        img = np.stack([c[k, 0] * xx + c[k, 1] * yy + c[k, 2] * (1 - xx) for k in range(3)], -1)
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img[blob] = rng.uniform(0, 1, 3)
        img = np.clip(img + tint + rng.normal(0, 0.05, img.shape), 0, 1)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(root / f"{i:03d}.png")
    return root


def tiny_transformers_clip(root: str | Path, seed: int = 0) -> Path:
    """A tiny transformers CLIPModel with its tokenizer and image processor, saved with
    save_pretrained (the layout of openai/clip-vit-large-patch14 on the hub)."""
    from transformers import (  # heavy: only the tests that need a CLIP build one
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    from scaletrain.data.encoders.tiny import BOS, EOS, clip_bpe_vocabulary
    from scaletrain.data.synthetic import CAPTION_WORDS

    root = Path(root)
    vocab, merges = clip_bpe_vocabulary(CAPTION_WORDS)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "bos_token_id": vocab[BOS],
                     "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(root)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(root)
    return root
