"""The evaluation of one set of weights, shared by every rank: validation loss, FID, CLIP score.

    evaluator = Evaluator(cfg.eval, EvalSetting.from_root(cfg), device=device,
                          stats_path=run_dir / "eval" / "fid_reference.npz")
    evaluator.loss(model_fn)            # {"loss", "loss_t/0.062", ..., "loss_samples"}
    evaluator.sample_metrics(model_fn)  # {"fid", "clip_score", "num_samples", ...}

Both are collectives: every rank calls them with its own ``model_fn`` (under ZeRO-3 the model
is sharded and each forward gathers), takes its share of the work (:mod:`.sharing`) and gets
the same result back. Training's hook (:mod:`scaletrain.train.monitor.evaluation`) calls
them on the EMA weights (and ``loss`` on the raw weights too); ``scaletrain eval`` calls them
on an export or a checkpoint.

Generated samples: image i takes prompt i mod P (``eval.prompts``, or the held-out captions)
and seed ``eval.seed + i``, and comes from :func:`scaletrain.sample.generate.generate`, the
one prompt -> image path (``scaletrain sample`` and the validation grids take it too). Each
image's features and CLIP score are computed as soon as its batch is generated; only the
feature rows are kept.

The encoders are built at the first evaluation, not at start-up: the text encoder encodes
this rank's prompts and is freed; the image encoder (to decode) stays, on the evaluation's
device, like Inception and CLIP.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from scaletrain.core.config_base import ConfigError
from scaletrain.data.encoders import build_image_encoder
from scaletrain.data.encoders.image import ImageEncoder
from scaletrain.diffusion import build_objective, build_sampler
from scaletrain.eval.clip_score import ClipScorer
from scaletrain.eval.config import EvalConfig
from scaletrain.eval.fid import (
    FeatureStats,
    build_inception,
    check_cached,
    feature_stats,
    fid_of,
    inception_features,
    load_stats,
    preprocessing,
    save_stats,
)
from scaletrain.eval.heldout import HeldOutSet, heldout_source
from scaletrain.eval.images import (
    center_crop_resize,
    generated_to_unit_range,
    image_units,
    pil_to_unit_range,
    read_unit,
    same_size_batches,
)
from scaletrain.eval.sharing import (
    assemble_rows,
    broadcast_from_main,
    global_batches,
    rank_counts,
    share_of,
    total_sum,
    world,
)
from scaletrain.eval.val_loss import validation_loss
from scaletrain.sample.conditioning import PromptConditioner
from scaletrain.sample.generate import generate
from scaletrain.sample.image_grid import images_to_uint8
from scaletrain.sample.pipeline import read_prompts

log = logging.getLogger(__name__)


@dataclass
class EvalSetting:
    """What evaluation needs to know of the model it evaluates and the data it came from."""

    diffusion: Any  # DiffusionConfig
    preprocess: Any  # PreprocessConfig (the image and text encoders)
    max_text_tokens: int
    arch: str
    sample_size: int  # the model's latent side
    data_path: str = ""  # data.path (for eval.holdout_shards)
    # (scaling_factor, shift_factor) the training data's latents were scaled with; None:
    # the image encoder's own.
    latent_scaling: tuple[float, float] | None = None

    @classmethod
    def from_root(cls, cfg, latent_scaling: tuple[float, float] | None = None) -> EvalSetting:
        return cls(cfg.diffusion, cfg.preprocess, cfg.data.max_text_tokens, cfg.model.arch,
                   cfg.model.sample_size, cfg.data.path, latent_scaling)


class Evaluator:
    """Validation loss, FID and CLIP score of ``model_fn``s, every rank sharing the work."""

    def __init__(self, cfg: EvalConfig, setting: EvalSetting, *,
                 device: torch.device | str = "cpu", stats_path: str | Path = "") -> None:
        self.cfg, self.setting = cfg, setting
        self.device = torch.device(device)
        self.stats_path = Path(cfg.fid_stats or stats_path or "fid_reference.npz")
        self.rank, self.world = world()
        self.objective = build_objective(setting.diffusion)
        self.sampler = build_sampler(setting.diffusion, name=cfg.sampler or None,
                                     steps=cfg.steps or None,
                                     guidance_scale=cfg.guidance_scale or None)
        self._heldout: HeldOutSet | None = None
        self._conditioner: PromptConditioner | None = None
        self._image_encoder: ImageEncoder | None = None
        self._inception = None
        self._clip: ClipScorer | None = None
        self._reference: FeatureStats | None = None
        self._reference_checked = False

    def should_run(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def settings(self) -> dict[str, Any]:
        """The settings an evaluation ran with (recorded in eval.json)."""
        cfg = self.cfg
        return {
            "metrics": list(cfg.metrics), "loss_samples": cfg.loss_samples,
            "timesteps": cfg.unit_timesteps(), "seed": cfg.seed, "batch_size": cfg.batch_size,
            "num_samples": cfg.num_samples, "prompts": cfg.prompts or "held-out captions",
            "sampler": type(self.sampler).__name__, "steps": self.sampler.steps,
            "guidance_scale": self.sampler.guidance_scale, "image_size": list(self.image_size),
            "heldout": cfg.data or (f"last {cfg.holdout_shards} shards of "
                                    f"{self.setting.data_path}" if cfg.holdout_shards else None),
            "inception": cfg.inception or "pytorch-fid URL", "fid_dims": cfg.fid_dims,
            "fid_reference": cfg.fid_reference or "held-out latents, decoded",
            "fid_stats": str(self.stats_path),
            "clip": {"model": cfg.clip_model, "library": cfg.clip_library,
                     "pretrained": cfg.clip_pretrained},
            "world_size": self.world,
        }

    # ------------------------------------------------------------------ lazily built parts

    @property
    def heldout(self) -> HeldOutSet:
        if self._heldout is None:
            source = heldout_source(self.cfg, self.setting.data_path)
            self._heldout = HeldOutSet(source, self.setting.max_text_tokens)
            self._keep_heldout(self._heldout, reference=self._needs_heldout_reference())
            log.info("held-out set: %d samples from %s", len(self._heldout), source.description)
        return self._heldout

    @property
    def image_encoder(self) -> ImageEncoder:
        if self._image_encoder is None:
            encoder = build_image_encoder(self.setting.preprocess, device=self.device)
            if self.setting.latent_scaling is not None:
                encoder.scaling_factor, encoder.shift_factor = self.setting.latent_scaling
            self._image_encoder = encoder
        return self._image_encoder

    @property
    def image_size(self) -> tuple[int, int]:
        side = self.setting.sample_size * self.image_encoder.downsample
        return side, side

    @property
    def inception(self):
        if self._inception is None:
            self._inception = build_inception(self.cfg.inception, self.cfg.fid_dims, "cpu")
        return self._inception

    @property
    def clip(self) -> ClipScorer:
        if self._clip is None:
            self._clip = ClipScorer(self.cfg.clip_model, self.cfg.clip_library,
                                    self.cfg.clip_pretrained, "cpu")
        return self._clip

    def prepare(self) -> None:
        """Load what the metrics need now (a training run calls this at start-up, so a
        missing Inception or CLIP file, or a bad held-out set, stops it before step 1, not at
        its first evaluation). Inception and CLIP wait on the CPU between evaluations."""
        cfg = self.cfg
        if "loss" in cfg.metrics or not cfg.prompts or (
                "fid" in cfg.sample_metrics and not cfg.fid_reference):
            heldout_source(cfg, self.setting.data_path)  # ConfigErrors name their key
        checks = []
        if cfg.prompts and cfg.sample_metrics:
            checks.append(("eval.prompts", lambda: read_prompts(cfg.prompts)))
        if "fid" in cfg.sample_metrics:
            checks.append(("eval.inception", lambda: self.inception))
            if cfg.fid_reference and not self.stats_path.is_file():
                checks.append(("eval.fid_reference",
                               lambda: image_units(cfg.fid_reference, cfg.batch_size)))
        if "clip" in cfg.sample_metrics:
            checks.append(("eval.clip_model", lambda: self.clip))
        for key, check in checks:
            try:
                check()
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{key}: {exc}") from exc

    @contextlib.contextmanager
    def _networks_on_device(self):
        """Inception and CLIP on the evaluation's device for the block, then back."""
        nets = [n for n in (self._inception, self._clip) if n is not None]
        for net in nets:
            net.model.to(self.device)
        if self._clip is not None:
            self._clip.device = self.device
        try:
            yield
        finally:
            for net in nets:
                net.model.to("cpu")
            if self._clip is not None:
                self._clip.device = torch.device("cpu")

    # ------------------------------------------------------------------ validation loss

    def _loss_batches(self) -> list[list[int]]:
        """The global batches of the loss: the first ``loss_samples`` held-out samples."""
        heldout = self.heldout
        n = min(len(heldout), self.cfg.loss_samples or len(heldout))
        return [c for c in ([i for i in b if i < n] for b in heldout.batches(self.cfg.batch_size))
                if c]

    def loss(self, model_fn) -> dict[str, float]:
        """The held-out validation loss of ``model_fn`` (a collective)."""
        batches = self._loss_batches()
        share = share_of(batches, self.rank, self.world)
        out = validation_loss(self.objective, model_fn, self.heldout, batches, share,
                              self.cfg.unit_timesteps(), self.cfg.seed, self.device)
        out["loss_samples"] = out.pop("samples")
        return out

    def _keep_heldout(self, heldout: HeldOutSet, reference: bool) -> None:
        """Keep the tensors of the held-out samples this rank computes on (the loss's share,
        the padding batch, and the reference's share while it is being computed)."""
        wanted: set[int] = set()
        if "loss" in self.cfg.metrics:
            share = share_of(self._loss_batches(), self.rank, self.world)
            for batch in share.batches + ([self._loss_batches()[0]] if share.padding else []):
                wanted.update(batch)
        if reference:
            for batch in share_of(heldout.batches(self.cfg.batch_size), self.rank,
                                  self.world).batches:
                wanted.update(batch)
        heldout.keep(wanted)

    def _needs_heldout_reference(self) -> bool:
        return ("fid" in self.cfg.sample_metrics and not self.cfg.fid_reference
                and not self.stats_path.is_file())

    # ------------------------------------------------------------------ FID and CLIP score

    def prompts_and_seeds(self) -> tuple[list[str], list[int]]:
        cfg = self.cfg
        pool = read_prompts(cfg.prompts) if cfg.prompts else self.heldout.captions
        prompts = [pool[i % len(pool)] for i in range(cfg.num_samples)]
        return prompts, [cfg.seed + i for i in range(cfg.num_samples)]

    def _conditioner_for(self, prompts: list[str], batches: list[list[int]]) -> PromptConditioner:
        """Encode this rank's prompts batch by batch (the global batches: the same encoder
        calls on any world size), then free the text encoder."""
        if self._conditioner is None:
            s = self.setting
            conditioner = PromptConditioner(s.preprocess, s.max_text_tokens, s.arch,
                                            s.diffusion.cfg_null, device="cpu")
            for batch in batches:
                conditioner.text([prompts[i] for i in batch])
            conditioner.release_encoder()
            self._conditioner = conditioner
        return self._conditioner

    def sample_metrics(self, model_fn) -> dict[str, Any]:
        """FID and CLIP score of ``num_samples`` images sampled from ``model_fn``."""
        cfg = self.cfg
        wanted = cfg.sample_metrics
        if not wanted:
            return {}
        if "fid" in wanted:
            _ = self.inception  # built before the move to the device
        if "clip" in wanted:
            _ = self.clip
        with self._networks_on_device():
            return self._sample_metrics(model_fn, wanted)

    def _sample_metrics(self, model_fn, wanted: list[str]) -> dict[str, Any]:
        cfg = self.cfg
        prompts, seeds = self.prompts_and_seeds()
        batches = global_batches(len(prompts), cfg.batch_size)
        share = share_of(batches, self.rank, self.world)
        runs = share.batches + [batches[0]] * share.padding
        conditioner = self._conditioner_for(prompts, runs)
        height, width = self.image_size
        owned, feats, scores = [], [], []
        for j, batch in enumerate(runs):
            pixels = generate(model_fn, self.sampler, conditioner, self.image_encoder,
                              [prompts[i] for i in batch], [seeds[i] for i in batch], height,
                              width, batch_size=len(batch), device=self.device)
            if j >= len(share.batches):
                continue  # a padding batch: only there to keep the model calls in step
            owned += batch
            if "fid" in wanted:
                feats.append(inception_features(self.inception, generated_to_unit_range(pixels)))
            if "clip" in wanted:
                images = [Image.fromarray(a) for a in images_to_uint8(pixels)]
                scores.append(self.clip.scores(images, [prompts[i] for i in batch]))
        out: dict[str, Any] = {"num_samples": len(prompts),
                               "generated_per_rank": rank_counts(len(owned), self.device)}
        if "clip" in wanted:
            local = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
            out["clip_score"] = float(assemble_rows(len(prompts), owned, local, self.device)
                                      .mean())
        if "fid" in wanted:
            local = torch.cat(feats) if feats else torch.zeros(0, self.cfg.fid_dims)
            features = assemble_rows(len(prompts), owned, local, self.device)
            reference = self.reference_stats()
            value = None
            if self.rank == 0:  # one rank does the float64 linear algebra
                value = (fid_of(feature_stats(features, what="generated samples"), reference),
                         reference.count)
            out["fid"], out["fid_reference_count"] = broadcast_from_main(value)
        return out

    # ------------------------------------------------------------------ reference statistics

    def reference_stats(self) -> FeatureStats | None:
        """The reference set's statistics on rank 0 (None elsewhere): from the cache, or
        computed by every rank from its share of the reference images, then cached. Every
        rank checks the cache and the image count, so bad input fails on all of them."""
        if self._reference is not None or (self.rank != 0 and self._reference_checked):
            return self._reference
        prep = preprocessing(self.image_size)
        if self.stats_path.is_file():
            stats = load_stats(self.stats_path)
            check_cached(stats, self.stats_path, self.cfg.fid_dims, self.inception.identity,
                         prep)
            log.info("FID reference statistics: %s (%d images)", self.stats_path, stats.count)
        else:
            source = self._reference_name()
            features, skipped = self._reference_features()
            if features.shape[0] < 2:
                raise ValueError(f"FID reference {source}: {features.shape[0]} readable "
                                 f"image(s) ({skipped} unreadable); FID needs at least 2")
            stats = None
            if self.rank == 0:
                meta = {"source": source, "inception": self.inception.identity,
                        "preprocessing": prep, "skipped": skipped}
                stats = save_stats(self.stats_path, feature_stats(features, meta))
                log.info("FID reference statistics of %d images (%d unreadable, skipped) "
                         "cached in %s", stats.count, skipped, self.stats_path)
            if self.cfg.fid_reference == "" and "loss" in self.cfg.metrics:
                self._keep_heldout(self.heldout, reference=False)  # free the reference's share
        self._reference_checked = True
        self._reference = stats if self.rank == 0 else None
        return self._reference

    def _reference_name(self) -> str:
        ref = self.cfg.fid_reference
        if not ref:
            return f"held-out latents of {self.heldout.source.description}, decoded"
        return str(Path(ref).resolve()) if Path(ref).exists() else ref

    def _reference_features(self) -> tuple[np.ndarray, int]:
        """Every reference image's features, in the reference's order, on every rank; and
        how many images could not be read."""
        size = self.image_size
        if self.cfg.fid_reference:
            return image_source_features(self.cfg.fid_reference, self.inception,
                                         self.cfg.batch_size, self.device, size)
        # The held-out latents, decoded by the run's image encoder.
        heldout, src = self.heldout, self.heldout.source
        mine = share_of(heldout.batches(self.cfg.batch_size), self.rank, self.world).batches
        rows = []
        for batch in mine:
            latents = heldout.collate(batch)["latents"] / src.scaling_factor + src.shift_factor
            pixels = self.image_encoder.decode(latents.to(self.image_encoder.device))
            images = [Image.fromarray(a) for a in images_to_uint8(pixels.float().cpu())]
            rows.append(features_of(self.inception, [center_crop_resize(im, size)
                                                     for im in images], self.cfg.batch_size))
        local = torch.cat(rows) if rows else torch.zeros(0, self.cfg.fid_dims)
        indices = [i for batch in mine for i in batch]
        return assemble_rows(len(heldout), indices, local, self.device).double().numpy(), 0


def features_of(inception, images: list[Image.Image], batch_size: int) -> torch.Tensor:
    """Inception features of PIL images, [N, dims] float32 (same-size runs batched)."""
    tensors = [pil_to_unit_range(im) for im in images]
    if not tensors:
        return torch.zeros(0, inception.dims)
    return torch.cat([inception_features(inception, batch)
                      for batch in same_size_batches(tensors, batch_size)])


def image_source_features(source: str, inception, batch_size: int, device: torch.device,
                          size: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """The features of every image of a folder or shard pattern, in its order, on every
    rank (each rank reads and runs its share of the units), and how many images could not
    be read. ``size``: centre-crop and resize each image to (h, w) first."""
    rank, world_size = world()
    units = image_units(source, batch_size)
    mine = share_of(list(range(len(units))), rank, world_size).batches
    rows, skipped = [], 0
    for u in mine:
        got = read_unit(units[u])
        skipped += got.skipped
        images = [center_crop_resize(im, size) for im in got.images] if size else got.images
        rows.append(features_of(inception, images, batch_size))
    # Where each unit's rows go: after every earlier unit's, whichever rank read it.
    counts = assemble_rows(len(units), mine, torch.tensor([float(len(r)) for r in rows],
                                                          dtype=torch.float64), device)
    offsets = [0, *np.cumsum(counts.long().tolist()).tolist()]
    indices = [i for u in mine for i in range(offsets[u], offsets[u + 1])]
    local = torch.cat(rows) if rows else torch.zeros(0, inception.dims)
    features = assemble_rows(int(offsets[-1]), indices, local, device)
    return features.double().numpy(), int(total_sum(skipped, device))
