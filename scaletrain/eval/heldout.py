"""The held-out set: latent shards training never reads, in one fixed order.

``eval.data`` names a directory of latent shards (``scaletrain preprocess`` output), or
``eval.holdout_shards=N`` takes the last N shards of ``data.path`` (the training loader
leaves them out: :func:`scaletrain.data.loader.build_train_loader`'s ``holdout_shards``).

The samples are read with the loader's own pieces (:func:`iter_samples`,
:func:`parse_sample`, :func:`collate`) in shard-name order and stored order, never shuffled,
so the set and its order are the same at every evaluation and any world size. Latents are the
stored posterior means (no draw): a fixed input. Each rank keeps the tensors of its own
batches only (:mod:`.sharing`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from scaletrain.core.config_base import ConfigError
from scaletrain.data.loader.batching import (
    BadSample,
    PendingSample,
    SampleSchema,
    collate,
    parse_sample,
)
from scaletrain.data.loader.dataset_index import ShardEntry, load_dataset_index
from scaletrain.data.loader.shard_reader import iter_samples
from scaletrain.data.shard_format import META_EXT
from scaletrain.eval.config import EvalConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOutSource:
    """Where the held-out set lives: its shards and the latent normalisation."""

    shards: tuple[ShardEntry, ...]
    scaling_factor: float
    shift_factor: float

    @property
    def description(self) -> str:
        names = [s.name for s in self.shards]
        root = str(self.shards[0].path).rsplit("/", 1)[0] if self.shards else "?"
        return f"{root} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def heldout_source(cfg: EvalConfig, data_path: str) -> HeldOutSource:
    """The shards of ``eval.data`` or the last ``eval.holdout_shards`` of ``data.path``."""
    if cfg.data:
        key, path = "eval.data", cfg.data
    elif cfg.holdout_shards:
        key, path = "data.path", data_path
        if not data_path:
            raise ConfigError("eval.holdout_shards: needs data.path (the shards to hold out)")
    else:
        raise ConfigError("eval.data: the held-out set is needed (the validation loss, held-out "
                          "captions as prompts, or the FID reference); set eval.data=PATH or "
                          "eval.holdout_shards=N")
    try:
        index = load_dataset_index(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    shards = index.shards
    if not cfg.data:
        if cfg.holdout_shards >= index.num_shards:
            raise ConfigError(f"eval.holdout_shards: {cfg.holdout_shards} of the "
                              f"{index.num_shards} shards in {path} leaves none to train on")
        shards = shards[-cfg.holdout_shards:]
    return HeldOutSource(tuple(shards), index.scaling_factor, index.shift_factor)


@dataclass
class HeldOutItem:
    index: int  # position in the held-out order
    key: str
    caption: str
    group: tuple  # (bucket name, latent shape): a batch holds one group
    sample: PendingSample | None  # tensors, kept for this rank's batches only


class HeldOutSet:
    """The first ``limit`` readable samples of a held-out source (0: all), in fixed order.

    ``batches(batch_size)`` cuts them into global batches of one group each (groups in order
    of first appearance, samples in held-out order within a group); ``keep(indices)`` keeps
    the tensors of the given samples and drops the others'; ``collate(indices)`` makes the
    loader's batch dict of kept samples.
    """

    def __init__(self, source: HeldOutSource, max_text_tokens: int, limit: int = 0) -> None:
        self.source = source
        self.max_text_tokens = max_text_tokens
        self.items: list[HeldOutItem] = []
        self.skipped = 0
        schema = None
        for shard in source.shards:
            try:
                for raw in iter_samples(shard.path):
                    if limit and len(self.items) >= limit:
                        break
                    try:
                        sample = parse_sample(raw.key, raw.files, 0, shard.shard_id,
                                              raw.position, schema)
                        caption = str(json.loads(bytes(raw.files[META_EXT])).get("caption", ""))
                    except BadSample as exc:
                        self.skipped += 1
                        log.warning("held-out set: %s: %s; skipped", shard.path, exc)
                        continue
                    if schema is None:  # the first sample's dims are the set's
                        t5 = sample.t5_hidden_states
                        schema = SampleSchema(sample.mean.shape[0], sample.hidden_states.shape[1],
                                              sample.pooled.shape[0],
                                              None if t5 is None else t5.shape[1])
                    self.items.append(HeldOutItem(len(self.items), raw.key, caption,
                                                  sample.group, sample))
            except Exception as exc:  # noqa: BLE001 - a damaged shard ends that shard only
                self.skipped += 1
                log.warning("held-out set: %s: unreadable after %d samples (%s); the rest of "
                            "the shard is skipped", shard.path, len(self.items), exc)
            if limit and len(self.items) >= limit:
                break
        if not self.items:
            raise ValueError(f"held-out set {source.description}: no readable sample")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def captions(self) -> list[str]:
        return [item.caption for item in self.items]

    def batches(self, batch_size: int) -> list[list[int]]:
        by_group: dict[tuple, list[int]] = {}
        for item in self.items:
            by_group.setdefault(item.group, []).append(item.index)
        out = []
        for indices in by_group.values():
            out += [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
        return out

    def keep(self, indices: set[int]) -> None:
        """Copy the kept samples out of the shards' memory maps; drop every other one."""
        for item in self.items:
            if item.index in indices and item.sample is not None:
                item.sample.detach()
            elif item.index not in indices:
                item.sample = None

    def collate(self, indices: list[int]) -> dict:
        samples = []
        for i in indices:
            sample = self.items[i].sample
            if sample is None:
                raise RuntimeError(f"held-out sample {i} was not kept by this rank")
            samples.append(sample)
        return collate(samples, scaling_factor=self.source.scaling_factor,
                       shift_factor=self.source.shift_factor, max_tokens=self.max_text_tokens,
                       sample_latents=False)


def noise_for(index: int, timestep: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed noise of held-out sample ``index`` at timestep number ``timestep``, from its
    own CPU generator: it depends on neither the batch, the rank nor the device. numpy's
    SeedSequence hashes the tuple, so neighbouring tuples give unrelated streams."""
    words = np.random.SeedSequence([seed, index, timestep]).generate_state(2)
    generator = torch.Generator().manual_seed(int((int(words[0]) << 31) ^ int(words[1])))
    return torch.randn(shape, generator=generator)
