"""Fréchet Inception Distance (Heusel et al. 2017) with pytorch-fid's network.

The network is pytorch-fid's ``InceptionV3`` (the port of the TF-FID graph, with its patched
blocks), built by pytorch-fid itself; only where its weights come from is ours to choose: a
file in pytorch-fid's state-dict format (``eval.inception`` / ``--inception``), or
pytorch-fid's own URL through the torch hub cache. Inputs are pytorch-fid's: RGB in [0, 1] at
the image's own size; the network resizes bilinearly to 299 x 299 and scales to [-1, 1].

FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), in float64. The trace of the
square root is computed without forming (S_1 S_2)^(1/2): with A = S_1^(1/2) (from the
eigendecomposition of the symmetric S_1, negative round-off eigenvalues clipped to 0),
S_1 S_2 = A (A S_2) has the eigenvalues of (A S_2) A = A S_2 A, which is symmetric positive
semi-definite; so Tr (S_1 S_2)^(1/2) = sum_i sqrt(lambda_i(A S_2 A)). Singular covariances
(fewer images than feature dimensions, the usual case in a quick evaluation) need no
regularising offset, unlike a general matrix square root (pytorch-fid adds 1e-6 I then).

When one side's features X (n rows, centred) are at hand and n <= d, S_2 = X^T X / (n - 1)
and the non-zero eigenvalues of S_1 S_2 are those of the n x n matrix X S_1 X^T / (n - 1)
(AB and BA share them): the same trace from an n x n eigenproblem instead of a d x d one
(2048 x 2048 eigendecompositions take seconds each; an evaluation's n is often smaller).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_fid
import pytorch_fid.inception as fid_inception
import torch
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

from scaletrain.core.files import atomic_output

log = logging.getLogger(__name__)

STATS_FORMAT = "scaletrain.fid_stats.v1"


def preprocessing(resize: tuple[int, int] | None) -> dict[str, Any]:
    """What was done to an image before Inception (recorded with cached statistics)."""
    return {
        "decode": "8-bit RGB (alpha composited on white), no EXIF rotation",
        "center_crop_resize": list(resize) if resize else None,  # PIL bicubic, (h, w)
        "network_input": "[0, 1] -> bilinear 299x299 (align_corners=False) -> [-1, 1]",
        "network": f"pytorch-fid {pytorch_fid.__version__} InceptionV3 (FID variant)",
    }


# --------------------------------------------------------------------------- the network


def _load_inception_state(weights: str | None) -> dict[str, torch.Tensor]:
    if weights is None:
        try:
            return fid_inception.load_state_dict_from_url(FID_WEIGHTS_URL, progress=False)
        except Exception as exc:  # noqa: BLE001 - any network or cache failure
            raise OSError(
                f"cannot fetch pytorch-fid's Inception weights from {FID_WEIGHTS_URL} ({exc}); "
                "without internet, copy that file here and pass its path (eval.inception=PATH "
                "or --inception PATH)") from exc
    path = Path(weights).expanduser()
    if not path.is_file():
        raise OSError(f"{path}: no such Inception weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many kinds
        raise ValueError(f"{path}: not a torch state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict (a {type(state).__name__})")
    return state


def weights_identity(state: dict[str, torch.Tensor]) -> str:
    """A digest of the weights themselves (names, shapes and values), so cached statistics
    are tied to the network that made them however its file was named or fetched."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


@dataclass
class Inception:
    model: torch.nn.Module
    dims: int
    identity: str


def build_inception(weights: str | None, dims: int = 2048,
                    device: torch.device | str = "cpu") -> Inception:
    """pytorch-fid's InceptionV3 returning ``dims``-wide features, with the given weights."""
    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ValueError(f"Inception features must be one of {sorted(InceptionV3.BLOCK_INDEX_BY_DIM)}"
                         f" wide, got {dims}")
    state = _load_inception_state(weights)
    where = str(weights) if weights else FID_WEIGHTS_URL
    # pytorch-fid's builder (fid_inception_v3) fetches its weights by URL inside the
    # constructor; hand it the state dict loaded above instead, so that the network, its
    # patched blocks and the strict load are all pytorch-fid's own.
    fetch = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{where}: not pytorch-fid's Inception state dict ({first})") from exc
    finally:
        fid_inception.load_state_dict_from_url = fetch
    return Inception(model.to(device).eval(), dims, weights_identity(state))


@torch.no_grad()
def inception_features(inception: Inception, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, dims] float32 on the CPU (pytorch-fid's get_activations:
    spatial average pooling where the block's output is not 1 x 1)."""
    device = next(inception.model.parameters()).device
    out = inception.model(images.to(device))[0]
    if out.shape[2] != 1 or out.shape[3] != 1:
        out = torch.nn.functional.adaptive_avg_pool2d(out, output_size=(1, 1))
    return out.squeeze(3).squeeze(2).float().cpu()


# --------------------------------------------------------------------------- statistics


@dataclass
class FeatureStats:
    """Mean and covariance (float64) of ``count`` feature rows, and how they were made."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    meta: dict[str, Any] = field(default_factory=dict)
    # The feature rows themselves (float64), when computed here rather than loaded.
    features: np.ndarray | None = field(default=None, repr=False)

    @property
    def dims(self) -> int:
        return int(self.mu.shape[0])


def feature_stats(features: np.ndarray | torch.Tensor, meta: dict[str, Any] | None = None,
                  what: str = "images") -> FeatureStats:
    """Mean and unbiased covariance (as pytorch-fid: np.cov, rows are samples) in float64."""
    x = np.asarray(features.numpy() if torch.is_tensor(features) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{what}: {x.shape[0] if x.ndim == 2 else 0} image(s); FID needs at "
                         "least 2")
    return FeatureStats(x.mean(axis=0), np.cov(x, rowvar=False), int(x.shape[0]),
                        dict(meta or {}), features=x)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """d^2 between N(mu1, sigma1) and N(mu2, sigma2) in float64 (see the module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2,
                                                                                   np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigen = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eigen, 0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    return max(value, 0.0)  # a distance: round-off can leave -1e-12 for identical sets


def fid_of(a: FeatureStats, b: FeatureStats) -> float:
    """The FID of two sets; through the n x n eigenproblem when one side's features are at
    hand and fewer than its dimensions (see the module docstring)."""
    if a.dims != b.dims:
        raise ValueError(f"feature dimensions differ: {a.dims} vs {b.dims}")
    small = min((s for s in (a, b) if s.features is not None and s.count <= s.dims),
                key=lambda s: s.count, default=None)
    if small is None:
        return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    other = b if small is a else a
    x = small.features - small.mu
    k = x @ other.sigma @ x.T / (small.count - 1)
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((k + k.T) / 2), 0, None)).sum())
    diff = a.mu - b.mu
    value = float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)
    return max(value, 0.0)


# --------------------------------------------------------------------------- the cache


def save_stats(path: str | Path, stats: FeatureStats) -> FeatureStats:
    """Write ``mu``, ``sigma`` (pytorch-fid's .npz keys, so pytorch-fid reads it too), the
    image count and the metadata as JSON, atomically."""
    path = Path(path)
    meta = {"format": STATS_FORMAT, **stats.meta, "count": stats.count, "dims": stats.dims}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, count=np.int64(stats.count),
                 meta=np.array(json.dumps(meta)))
    return stats


def load_stats(path: str | Path) -> FeatureStats:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
            count = int(data["count"]) if "count" in data else int(meta.get("count", 0))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a statistics file (.npz with mu and sigma): {exc}") from exc
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return FeatureStats(mu, sigma, count, meta)


def check_cached(stats: FeatureStats, path: Path, dims: int, identity: str,
                 prep: dict[str, Any]) -> None:
    """Cached statistics must come from the same network, width and preprocessing."""
    if stats.dims != dims:
        raise ValueError(f"{path}: cached statistics have {stats.dims}-d features, the "
                         f"Inception features here are {dims}-d; delete the file or use another")
    got = stats.meta.get("inception")
    if got is not None and got != identity:
        raise ValueError(f"{path}: cached statistics were made with Inception weights {got}, "
                         f"these are {identity}; delete the file or use another")
    recorded = stats.meta.get("preprocessing")
    if recorded is not None and recorded != prep:
        raise ValueError(f"{path}: cached statistics were made with another preprocessing "
                         f"({recorded}); delete the file or use another")
