"""FID: the Fréchet distance against closed forms and pytorch-fid; the network, the image
reading, the statistics cache and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import (
    calculate_fid_given_paths,
    calculate_frechet_distance,
    get_activations,
)
from pytorch_fid.inception import InceptionV3

from scaletrain.eval.evaluator import image_source_features
from scaletrain.eval.fid import (
    build_inception,
    check_cached,
    feature_stats,
    fid_of,
    frechet_distance,
    load_stats,
    preprocessing,
    save_stats,
)
from scaletrain.eval.offline import fid_between
from tests.support.tiny import REPO


def _spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


def test_fid_of_a_set_against_itself_is_zero_and_fid_is_symmetric():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 16))
    y = rng.normal(size=(40, 16)) @ rng.normal(size=(16, 16))
    a, b = feature_stats(x), feature_stats(y)
    assert abs(fid_of(a, a)) < 1e-6
    assert abs(frechet_distance(a.mu, a.sigma, a.mu, a.sigma)) < 1e-6
    assert fid_of(a, b) == pytest.approx(fid_of(b, a), rel=1e-10)
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(
        frechet_distance(b.mu, b.sigma, a.mu, a.sigma), rel=1e-10)


def test_gaussians_with_known_parameters_give_the_closed_form():
    # Commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected,
                                                                                  rel=1e-12)
    # Non-commuting 2x2: S1 S2 has positive eigenvalues l1, l2, and
    # Tr sqrt(S1 S2) = sqrt(l1) + sqrt(l2) = sqrt(Tr(S1 S2) + 2 sqrt(det(S1 S2))).
    theta = 0.7
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    c1, c2 = np.diag([2.0, 0.5]), rot @ np.diag([3.0, 0.1]) @ rot.T
    m = c1 @ c2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert frechet_distance(np.zeros(2), c1, np.zeros(2), c2) == pytest.approx(expected,
                                                                               rel=1e-12)


def test_features_drawn_from_known_gaussians_approach_the_closed_form():
    rng = np.random.default_rng(1)
    d = 4
    c1, c2 = _spd(rng, d), _spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    exact = frechet_distance(mu1, c1, mu2, c2)
    n = 200_000
    x = rng.multivariate_normal(mu1, c1, size=n)
    y = rng.multivariate_normal(mu2, c2, size=n)
    assert fid_of(feature_stats(x), feature_stats(y)) == pytest.approx(exact, rel=0.02)


@pytest.mark.parametrize("rank1, rank2", [(None, None), (5, 7), (3, None)])
def test_equals_pytorch_fid_including_singular_covariances(rank1, rank2):
    """Full-rank and singular covariances (rank below the dimension, as with fewer images
    than features): our float64 eigen-route equals pytorch-fid's sqrtm-based formula, and
    the n x n route (features at hand) equals the d x d one."""
    rng = np.random.default_rng(2)
    d = 24
    x = rng.normal(size=(rank1 + 1 if rank1 else 400, d)) * 2.0
    y = rng.normal(size=(rank2 + 1 if rank2 else 400, d)) @ _spd(rng, d) + 0.3
    a, b = feature_stats(x), feature_stats(y)
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    reference = calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert ours == pytest.approx(reference, rel=1e-6)
    # The d x d route takes square roots of round-off eigenvalues (~1e-16 -> ~1e-8 each) where
    # the covariance is singular; the n x n route has none: they agree to ~1e-8.
    assert fid_of(a, b) == pytest.approx(ours, rel=1e-7)


@pytest.mark.slow
def test_our_fid_of_two_folders_equals_pytorch_fid(folders, inception_weights, monkeypatch):
    """pytorch-fid end to end, unmodified: it finds the same (random) weights file in the
    torch hub cache under its own file name, as it would after downloading it. At 2048
    dimensions its scipy sqrtm of a singular 2048 x 2048 product takes over a minute here,
    so the full FID is compared at 192 dimensions, and the 2048-d pool features themselves
    against pytorch-fid's get_activations."""
    real, fake = folders
    monkeypatch.setenv("TORCH_HOME", str(inception_weights.parents[2]))
    for dims in (192,):
        theirs = calculate_fid_given_paths([str(real), str(fake)], batch_size=3, device="cpu",
                                           dims=dims, num_workers=0)
        ours = fid_between(str(real), str(fake), inception=str(inception_weights), dims=dims,
                           batch_size=4)
        assert ours["fid"] > 0
        assert ours["fid"] == pytest.approx(float(theirs), rel=1e-3), dims
        assert ours["real"]["count"] == ours["fake"]["count"] == 6
    files = sorted(real.glob("*.png"))
    theirs = get_activations(files, InceptionV3([3]), batch_size=3, dims=2048, num_workers=0)
    inception = build_inception(str(inception_weights), 2048)
    ours, skipped = image_source_features(str(real), inception, 4, torch.device("cpu"))
    assert skipped == 0 and ours.shape == theirs.shape == (6, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    # The default (no path) fetches pytorch-fid's URL through the same hub cache.
    assert build_inception(None, 64).identity == build_inception(str(inception_weights),
                                                                 64).identity


def test_statistics_cache_round_trip_and_pytorch_fid_reads_it(folders, inception_weights,
                                                              tmp_path, monkeypatch):
    real, fake = folders
    inception = build_inception(str(inception_weights), 64)
    result = fid_between(str(real), str(fake), inception=str(inception_weights), dims=64,
                         batch_size=6)
    features, skipped = image_source_features(str(real), inception, 6, torch.device("cpu"))
    meta = {"source": str(real), "inception": inception.identity,
            "preprocessing": preprocessing(None)}
    path = tmp_path / "real.npz"
    save_stats(path, feature_stats(features, meta))
    loaded = load_stats(path)
    assert loaded.count == 6 and loaded.dims == 64 and loaded.meta["source"] == str(real)
    assert skipped == 0
    check_cached(loaded, path, 64, inception.identity, preprocessing(None))
    # The cached statistics give the same FID as the folder; pytorch-fid reads the file too.
    cached = fid_between(str(path), str(fake), inception=str(inception_weights), dims=64,
                         batch_size=6)
    assert cached["fid"] == pytest.approx(result["fid"], rel=1e-7)  # d x d vs n x n route
    monkeypatch.setenv("TORCH_HOME", str(inception_weights.parents[2]))
    theirs = calculate_fid_given_paths([str(path), str(fake)], batch_size=6, device="cpu",
                                       dims=64, num_workers=0)
    assert float(theirs) == pytest.approx(result["fid"], rel=1e-3)
    # A cache of another width, or of other weights, is refused with the file named.
    with pytest.raises(ValueError, match=r"real.npz: cached statistics have 64-d features, "
                                         r"the Inception features here are 192-d"):
        fid_between(str(path), str(fake), inception=str(inception_weights), dims=192)
    with pytest.raises(ValueError, match="made with Inception weights"):
        check_cached(loaded, path, 64, "sha256:other", preprocessing(None))


def test_unreadable_images_are_skipped_and_counted(folders, inception_weights, tmp_path):
    real, fake = folders
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for src in sorted(real.glob("*.png"))[:3]:
        (mixed / src.name).write_bytes(src.read_bytes())
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (mixed / "empty.jpg").write_bytes(b"")
    result = fid_between(str(mixed), str(fake), inception=str(inception_weights), dims=64)
    assert result["real"] == {"source": str(mixed), "count": 3, "skipped": 2}
    assert math.isfinite(result["fid"])
    with pytest.raises(ValueError, match="nowhere: no such image folder or shard"):
        fid_between(str(tmp_path / "nowhere"), str(fake), inception=str(inception_weights),
                    dims=64)


def _cli(*args, env=None):
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "scaletrain.cli", "eval", *args], env=full,
                          capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_cli_prints_the_number_writes_json_and_fails_clearly(folders, inception_weights,
                                                             tmp_path):
    real, fake = folders
    common = ["--inception", str(inception_weights), "--dims", "64", "--batch-size", "6"]
    plain = _cli("fid", str(real), str(fake), *common)
    assert plain.returncode == 0, plain.stderr
    record = _cli("fid", str(real), str(fake), *common, "--json", "--out", str(tmp_path))
    assert record.returncode == 0, record.stderr
    data = json.loads(record.stdout)
    assert float(plain.stdout.strip()) == pytest.approx(data["fid"], rel=1e-6)
    assert json.loads((tmp_path / "eval.json").read_text()) == data
    assert data["real"]["count"] == 6 and data["settings"]["dims"] == 64

    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((real / "000.png").read_bytes())
    bad = _cli("fid", str(one), str(fake), *common)
    assert bad.returncode == 1
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert lines[-1] == f"scaletrain eval: error: {one}: 1 image(s); FID needs at least 2"
    assert "Traceback" not in bad.stderr
    offline = _cli("fid", str(real), str(fake), "--dims", "64",
                   env={"TORCH_HOME": str(tmp_path / "empty_hub")})
    assert offline.returncode == 1
    assert "cannot fetch pytorch-fid's Inception weights" in offline.stderr
    assert "--inception PATH" in offline.stderr
