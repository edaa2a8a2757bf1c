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

import contextlib
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


def _session_cluster(nodes: int):
    reason = _cannot_install_reason()
    if reason is not None:
        if _in_ci():
            pytest.fail(f"CI must run the slurm tests, but: {reason}", pytrace=False)
        pytest.skip(reason)
    # Not under pytest's tmp dirs: munged (running as the munge user) must be able to
    # traverse every parent of its socket directory.
    root = Path(tempfile.mkdtemp(prefix="scaletrain-slurm-"))
    root.chmod(0o755)
    cluster = LocalSlurmCluster(root / "cluster", nodes=nodes)
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        if nodes > 1 and not _in_ci():  # e.g. no network namespaces in this container
            pytest.skip(f"could not start a {nodes}-node SLURM cluster: {exc}")
        pytest.fail(f"could not start the SLURM cluster: {exc}", pytrace=False)
    return root, cluster


@contextlib.contextmanager
def _cluster_env(root, cluster):
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


@pytest.fixture(scope="session")
def slurm_cluster():
    with _cluster_env(*_session_cluster(1)) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def _multinode_session():
    root, cluster = _session_cluster(2)
    try:
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("SCALETRAIN_KEEP_SLURM_STATE") != "1":
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slurm_multinode_cluster(_multinode_session):
    """Two compute nodes, each slurmd in its own network namespace (own address, own eth0),
    their names in /etc/hosts while the session lasts. Its own slurmctld (the single-node
    tests keep a node named after this host), started once per session in about 11 s;
    SLURM_CONF points at it only during each test that uses it, so both clusters can serve
    one session."""
    cluster = _multinode_session
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
