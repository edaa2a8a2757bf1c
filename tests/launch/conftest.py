"""A real SLURM cluster for the tests marked `slurm`, started once per session.

The fixture installs the Debian packages when they are missing (CI runs as root with apt),
starts munged, MariaDB, slurmdbd, slurmctld and slurmd with all state in a temporary
directory (tests.support.slurm_cluster), points SLURM_CONF at it for the whole session, and stops
every daemon by PID at the end.

In CI (CI=true) a cluster that cannot start FAILS the tests: they never skip there. Locally
they skip only when the packages are missing and cannot be installed (no apt-get or not
root), with that reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.slurm_cluster import ClusterUnavailable, LocalSlurmCluster, missing_binaries


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _cannot_install_reason() -> str | None:
    """Why the packages can't be installed here, or None when they are present/installable."""
    missing = missing_binaries()
    if not missing:
        return None
    if shutil.which("apt-get") is None:
        return f"SLURM not installed ({', '.join(missing)} missing) and apt-get unavailable"
    if os.geteuid() != 0:
        return f"SLURM not installed ({', '.join(missing)} missing); installing needs root"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _cannot_install_reason()
    if reason is not None:
        if _in_ci():
            pytest.fail(f"CI must run the slurm tests, but: {reason}", pytrace=False)
        pytest.skip(reason)
    # Not under pytest's tmp dirs: munged (running as the munge user) must be able to
    # traverse every parent of its socket directory.
    root = Path(tempfile.mkdtemp(prefix="scaletrain-slurm-"))
    root.chmod(0o755)
    cluster = LocalSlurmCluster(root / "cluster")
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start the SLURM cluster: {exc}", pytrace=False)
    saved = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if os.environ.get("SCALETRAIN_KEEP_SLURM_STATE") != "1":
            shutil.rmtree(root, ignore_errors=True)
