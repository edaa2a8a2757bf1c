"""Tiny, seeded stand-ins for the real encoders, saved to disk in the real formats.

The offline demo needs a text encoder without a model hub, and tests (here and in the
sampler) need every loading path exercised without downloads. Each builder here creates a
model from a small config with a fixed seed and saves it with the library's own
``save_pretrained`` (or open_clip's checkpoint layout); the pipeline then loads it back from
that path through exactly the code that loads the real models.

The tokenizer of the tiny CLIP is a real :class:`transformers.CLIPTokenizer` (byte-level
BPE) over a small vocabulary: the 26 letters, so any lowercase word still tokenizes, plus
whole-word merges for the demo's caption words, so those are one token each. Random
weights still give caption-dependent embeddings (different tokens), which is all a demo
model needs to tell "a red circle" from "a blue square".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model

from scaletrain.data.synthetic import CAPTION_WORDS

log = logging.getLogger(__name__)

# Bump when the build below changes, so caches built by older code are not reused.
TINY_BUILD_VERSION = 1
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def clip_bpe_vocabulary(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary: letters, one merge chain per word, specials last.

    CLIP marks the end of a word with ``</w>``; "red" becomes r + e + d</w>, merged by
    "r e" -> "re" and "re d</w>" -> "red</w>". The special tokens take the two highest ids,
    as in OpenAI's vocabulary (CLIP's pooling looks for the end-of-text token).
    """
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for ch in string.ascii_lowercase + string.digits + ".,'-!?":
        add(ch)
        add(ch + "</w>")
    for word in sorted({w.lower() for w in words if w.isalpha() and len(w) > 1}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for nxt in parts[1:]:
            merge = (merged, nxt)
            merged = merged + nxt
            if merge not in merges:
                merges.append(merge)
            add(merged)
    add(BOS)
    add(EOS)
    return vocab, merges


@contextlib.contextmanager
def _seeded(seed: int):
    """Initialise under a fixed seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _save_transformers_model(model, tokenizer, out_dir: Path) -> Path:
    """``save_pretrained``'s files of a model and its tokenizer, whatever the process's rank.

    transformers' ``save_pretrained`` writes the weights only on torch.distributed rank 0; the
    tiny encoders are built by whichever rank of a training job gets there first (validation
    encodes prompts on every rank), so the weights are written here instead.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    # save_model drops the aliases of tied weights (T5's shared embedding) as transformers does.
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_tiny_clip(
    out_dir: str | Path,
    words: Iterable[str],
    hidden_size: int = 64,
    projection_dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_length: int = 32,
    seed: int = 0,
) -> Path:
    """A CLIPTextModelWithProjection + CLIPTokenizer saved with save_pretrained."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer  # heavy

    out_dir = Path(out_dir)
    vocab, merges = clip_bpe_vocabulary(words)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    with _seeded(seed):
        model = CLIPTextModelWithProjection(config).eval()
    return _save_transformers_model(model, tokenizer, out_dir)


def save_tiny_t5(
    out_dir: str | Path,
    words: Iterable[str],
    d_model: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
) -> Path:
    """A T5EncoderModel + T5Tokenizer (unigram over letters and whole words)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer  # heavy

    out_dir = Path(out_dir)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -5.0) for ch in string.ascii_lowercase + string.digits + ".,'-!?"]
    pieces += [("\u2581" + w.lower(), -1.0) for w in sorted(set(words)) if w.isalpha()]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    config = T5Config(
        vocab_size=len(pieces),
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with _seeded(seed):
        model = T5EncoderModel(config).eval()
    return _save_transformers_model(model, tokenizer, out_dir)


def tiny_open_clip_model_config(width: int = 32, layers: int = 2, embed_dim: int = 32) -> dict:
    """An open_clip model config with a tiny text tower (and a token vision tower)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": 16,
            "layers": 1,
            "width": 16,
            "head_width": 8,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,  # open_clip's bundled BPE tokenizer
            "width": width,
            "heads": 2,
            "layers": layers,
        },
    }


def save_tiny_open_clip(
    out_dir: str | Path,
    name: str = "tiny-openclip",
    width: int = 32,
    layers: int = 2,
    embed_dim: int = 32,
    seed: int = 0,
) -> dict[str, str]:
    """An open_clip CLIP in both local layouts open_clip reads.

    Writes ``{name}.json`` (a model config for ``open_clip.add_model_config``) next to
    ``{name}.safetensors`` (its weights, for ``pretrained=``), and a ``local-dir``
    folder (``open_clip_config.json`` + ``open_clip_model.safetensors``). Returns the
    paths under the keys ``model_config``, ``pretrained`` and ``local_dir``.
    """
    import open_clip  # heavy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = tiny_open_clip_model_config(width, layers, embed_dim)
    config_path = out_dir / f"{name}.json"
    config_path.write_text(json.dumps(model_cfg, indent=1), encoding="utf-8")
    open_clip.add_model_config(config_path)
    with _seeded(seed):
        model = open_clip.create_model(name, pretrained=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights = out_dir / f"{name}.safetensors"
    save_file(state, str(weights))
    local_dir = out_dir / f"{name}-local"
    local_dir.mkdir(exist_ok=True)
    (local_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg}, indent=1), encoding="utf-8"
    )
    save_file(state, str(local_dir / "open_clip_model.safetensors"))
    return {
        "model_config": str(config_path),
        "pretrained": str(weights),
        "local_dir": str(local_dir),
    }


def save_tiny_vae(
    out_dir: str | Path,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (8, 16),
    scaling_factor: float = 0.5,
    shift_factor: float | None = None,
    seed: int = 0,
) -> Path:
    """A diffusers AutoencoderKL with SDXL's layout and tiny widths, saved with
    save_pretrained. Downsampling is 2 ** (len(block_out_channels) - 1)."""
    from diffusers import AutoencoderKL  # heavy

    n = len(block_out_channels)
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=min(block_out_channels),
            sample_size=32,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
        ).eval()
    out_dir = Path(out_dir)
    vae.save_pretrained(out_dir)
    return out_dir


def ensure_tiny_clip(cfg, words: Iterable[str] | None = None) -> Path:
    """The directory of the demo's tiny CLIP for ``cfg`` (a TinyTextConfig), built and saved
    on first use. The directory name hashes everything the build depends on, so a changed
    config never reuses a stale model; concurrent first uses (several workers, several SLURM
    tasks) each build in a private folder and the first rename wins."""
    if words is None:
        words = CAPTION_WORDS
    words = sorted(set(words))
    spec = {
        "version": TINY_BUILD_VERSION,
        "hidden_size": cfg.hidden_size,
        "projection_dim": cfg.projection_dim,
        "layers": cfg.layers,
        "heads": cfg.heads,
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        "words": words,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(os.path.expanduser(os.path.expandvars(cfg.cache_dir)))
    target = cache / f"tiny_clip-{digest}"
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Every rank of a job may get here at once: one builds under the lock, the others wait
    # and find it built.
    with open(cache / f".tiny_clip-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=".tiny_clip-", dir=cache))
        try:
            save_tiny_clip(
                staging,
                words,
                hidden_size=cfg.hidden_size,
                projection_dim=cfg.projection_dim,
                layers=cfg.layers,
                heads=cfg.heads,
                max_length=cfg.max_length,
                seed=cfg.seed,
            )
            staging.rename(target)
            log.info("built the tiny demo text encoder in %s", target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny_clip-", dir=cache))
    try:
        save_tiny_clip(
            staging,
            words,
            hidden_size=cfg.hidden_size,
            projection_dim=cfg.projection_dim,
            layers=cfg.layers,
            heads=cfg.heads,
            max_length=cfg.max_length,
            seed=cfg.seed,
        )
        try:
            staging.rename(target)
            log.info("built the tiny demo text encoder in %s", target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
