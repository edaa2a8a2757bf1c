"""A real single-node SLURM cluster in a temporary directory, for tests and CI.

Starts munged, MariaDB, slurmdbd (so ``sacct`` works: submitit reads job states from it,
and without it a crashed job can look alive forever), slurmctld and slurmd from the Debian
packages, with every piece of state (configs, spool, logs, pid files, database) under one
directory. Nothing is started through systemd (PID 1 is not systemd on these machines): each
daemon runs in the foreground in its own session, and ``stop()`` ends exactly the processes
this object started, by PID.

Use it as a context manager, or from a shell for manual experiments::

    python -m tests.support.slurm_cluster --root /tmp/slurm-play
    # prints `export SLURM_CONF=...`; Ctrl-C stops every daemon

Facts this relies on (SLURM 22.05 on Debian bookworm; see shared/slurm-in-ci.md):
- the munge socket directory must be mode 711 and owned by munge, munged runs as munge;
- ``AccountingStoragePass`` must name the munge socket, or slurmctld looks for the default
  socket and dies;
- ``cred_expire`` is also how long a requeued job waits before it may start again (the
  default 120 s makes every requeue cost ~150 s; 10 s brings it to ~12 s);
- a slurmd started while slurmctld is down may ignore SIGTERM: stop slurmd first.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from scaletrain.core.dist_env import free_port

logger = logging.getLogger(__name__)

# Debian packages that provide the daemons and clients, and one binary of each to probe.
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
REQUIRED_BINARIES = [
    "munged", "slurmctld", "slurmd", "slurmdbd", "sbatch", "srun", "sacct", "sacctmgr",
    "scontrol", "squeue", "scancel", "sinfo", "mariadbd", "mariadb-install-db",
]
MUNGE_KEY = Path("/etc/munge/munge.key")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


# --------------------------------------------------------------------------- packages


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


def ensure_packages(install: bool = True) -> None:
    """Install the Debian packages when a binary is missing (needs root and apt-get)."""
    missing = missing_binaries()
    if not missing:
        return
    if not install:
        raise ClusterUnavailable(f"SLURM binaries missing: {', '.join(missing)}")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"SLURM binaries missing ({', '.join(missing)}) and no apt-get")
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            f"SLURM binaries missing ({', '.join(missing)}); installing them needs root"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    logger.info("installing %s with apt-get", " ".join(PACKAGES))
    cmds = [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ]
    for cmd in cmds:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterUnavailable(
                f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                f"\n{proc.stderr[-2000:]}"
            )
    still = missing_binaries()
    if still:
        raise ClusterUnavailable(f"after apt-get install, still missing: {', '.join(still)}")


# --------------------------------------------------------------------------- helpers


def _wait_for(what: str, predicate, timeout: float, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise ClusterUnavailable(
                f"{what}: the daemon exited with {proc.returncode}{_log_tail(log)}"
            )
        time.sleep(0.2)
    raise ClusterUnavailable(f"{what}: not ready after {timeout:.0f} s{_log_tail(log)}")


def _log_tail(log: Path | None, chars: int = 3000) -> str:
    if log is None or not log.exists():
        return ""
    return f"\n--- {log} (tail) ---\n{log.read_text(errors='replace')[-chars:]}"


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _processes_in_session(sid: int) -> list[int]:
    """PIDs whose session id is ``sid`` (slurmstepd daemons forked by our slurmd)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and int(entry.name) != sid:
            pids.append(int(entry.name))
    return pids


# --------------------------------------------------------------------------- the cluster


class NodeNetwork:
    """N test hosts on this machine: a network namespace per node, joined by a bridge.

    The bridge holds ``<subnet>.1`` in the root namespace (slurmctld listens there); node K
    gets a veth pair, one end on the bridge, the other as ``eth0`` with ``<subnet>.(10+K)``
    inside its namespace. Node names get /etc/hosts lines (marked with this network's tag)
    so that ``getent hosts stXXXXn1`` answers as on a cluster; ``remove()`` deletes exactly
    those lines, the namespaces and the bridge. Names carry a per-process tag so that two
    clusters on one machine do not collide.
    """

    IFNAME = "eth0"
    HOSTS = Path("/etc/hosts")
    _made = itertools.count()

    def __init__(self, nodes: int) -> None:
        # Per process and per network: a second network in one process (the teardown test
        # beside the session's cluster) must never name, and so remove, the first's parts.
        tag = f"{os.getpid() % 100000:05d}{chr(ord('a') + next(NodeNetwork._made) % 26)}"
        self.tag = f"st{tag}"
        self.names = [f"{self.tag}n{k}" for k in range(1, nodes + 1)]
        self.bridge = f"{self.tag}br"
        self.subnet = ""
        self.created: list[tuple[str, str]] = []  # ("netns"|"link", name), for remove()

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    @property
    def addresses(self) -> list[str]:
        return [f"{self.subnet}.{10 + k}" for k in range(1, len(self.names) + 1)]

    @property
    def marker(self) -> str:
        return f"# scaletrain test cluster {self.tag}"

    @staticmethod
    def netns_path(name: str) -> str:
        return f"/run/netns/{name}"

    def _free_subnet(self) -> str:
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        # 10.250.X.0/24: a range these test hosts alone use; X differs per live cluster.
        for third in range(os.getpid() % 200, 256):
            subnet = f"10.250.{third}"
            if f" {subnet}." not in used:
                return subnet
        raise ClusterUnavailable("no free 10.250.X.0/24 subnet for the test nodes")

    def _ip(self, *args: str, netns: str | None = None) -> None:
        cmd = ["ip", *args] if netns is None else ["ip", "-n", netns, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")

    def create(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None:
            raise ClusterUnavailable("a multi-node test cluster needs root, ip and nsenter")
        self.subnet = self._free_subnet()
        self._ip("link", "add", self.bridge, "type", "bridge")
        self.created.append(("link", self.bridge))
        self._ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for k, (name, addr) in enumerate(zip(self.names, self.addresses, strict=True), 1):
            host_end, node_end = f"{self.tag}v{k}", f"{self.tag}p{k}"
            self._ip("netns", "add", name)
            self.created.append(("netns", name))
            self._ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            self.created.append(("link", host_end))  # deleting one end deletes the pair
            self._ip("link", "set", host_end, "master", self.bridge)
            self._ip("link", "set", host_end, "up")
            self._ip("link", "set", node_end, "netns", name)
            self._ip("link", "set", node_end, "name", self.IFNAME, netns=name)
            self._ip("addr", "add", f"{addr}/24", "dev", self.IFNAME, netns=name)
            self._ip("link", "set", self.IFNAME, "up", netns=name)
            self._ip("link", "set", "lo", "up", netns=name)
        lines = "".join(f"{addr} {name} {self.marker}\n"
                        for name, addr in zip(self.names, self.addresses, strict=True))
        text = self.HOSTS.read_text()
        # In place: /etc/hosts is often a bind mount that a rename cannot replace.
        with open(self.HOSTS, "a") as f:
            f.write(("" if text.endswith("\n") or not text else "\n") + lines)

    def remove(self) -> None:
        """Undo create(): our /etc/hosts lines, namespaces and links; nothing else."""
        try:
            text = self.HOSTS.read_text()
            kept = [line for line in text.splitlines(keepends=True) if self.marker not in line]
            if len(kept) != len(text.splitlines(keepends=True)):
                with open(self.HOSTS, "w") as f:
                    f.write("".join(kept))
        except OSError as exc:
            logger.warning("could not remove the test nodes from %s: %s", self.HOSTS, exc)
        for kind, name in reversed(self.created):
            args = ["netns", "del", name] if kind == "netns" else ["link", "del", name]
            proc = subprocess.run(["ip", *args], capture_output=True, text=True)
            if proc.returncode != 0 and "Cannot find" not in proc.stderr:
                logger.warning("`ip %s`: %s", " ".join(args), proc.stderr.strip())
        self.created.clear()


@dataclass
class _Daemon:
    name: str
    proc: subprocess.Popen
    log: Path


@dataclass
class LocalSlurmCluster:
    """One partition, accounting through slurmdbd, all state under ``root``.

    ``nodes=1``: one slurmd on this host's own name and 127.0.0.1 (the single-node tests).
    ``nodes>=2``: each slurmd in its own network namespace with its own address on a
    bridge, like separate hosts (see :class:`NodeNetwork`): traffic between ranks crosses
    real interfaces, and the node names resolve through /etc/hosts as on a cluster.
    """

    root: Path
    cpus: int = 2
    real_memory_mb: int = 4000
    partition: str = "debug"
    cluster_name: str = "scaletrain-ci"
    install: bool = True
    # Seconds a requeued job waits before it may start again (see module docstring).
    cred_expire_s: int = 10
    nodes: int = 1
    _daemons: list[_Daemon] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.network = NodeNetwork(self.nodes) if self.nodes > 1 else None

    @property
    def node_names(self) -> list[str]:
        return self.network.names if self.network is not None else [self.hostname]

    @property
    def socket_ifname(self) -> str | None:
        """The interface ranks must talk over (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME):
        every namespace shares the host name, which resolves to 127.0.0.1."""
        return NodeNetwork.IFNAME if self.network is not None else None

    # ----------------------------------------------------------------- public

    @property
    def env(self) -> dict[str, str]:
        """Variables a client (sbatch, sacct, submitit) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 120.0) -> LocalSlurmCluster:
        ensure_packages(self.install)
        if not MUNGE_KEY.exists():
            raise ClusterUnavailable(f"{MUNGE_KEY} missing: the munge package creates it")
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel jobs, then end every daemon we started, newest first, by PID; then remove
        the namespaces, bridge and /etc/hosts lines of a multi-node cluster."""
        if any(d.name == "slurmctld" for d in self._daemons):
            self._cancel_all_jobs()
        for slurmd in [d for d in self._daemons if d.name.startswith("slurmd-")]:
            # Job step daemons (slurmstepd) outlive slurmd by design; they stay in its
            # session, so the session id finds exactly ours.
            for pid in _processes_in_session(slurmd.proc.pid):
                self._kill_tree(pid)
        for daemon in reversed(self._daemons):
            self._terminate(daemon)
        self._daemons.clear()
        if self.network is not None:
            self.network.remove()

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        """Run a SLURM client command against this cluster and return its stdout."""
        proc = subprocess.run(
            list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def logs(self, chars: int = 4000) -> str:
        """The tail of every daemon log, for failure messages."""
        return "".join(_log_tail(d.log, chars) for d in self._daemons)

    # ----------------------------------------------------------------- start-up

    def _start(self, timeout: float) -> None:
        for sub in ("etc", "state", "spool", "log", "run", "munge", "mysql"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged (running as munge) must traverse the tree to reach its socket directory.
        os.chmod(self.root, 0o755)
        for parent in self.root.parents:
            if not parent.stat().st_mode & 0o001:
                raise ClusterUnavailable(
                    f"{parent} is not searchable by other users (mode "
                    f"{parent.stat().st_mode & 0o777:o}): munged, running as the munge user, "
                    f"could not reach its socket under {self.root}"
                )
        self.slurmctld_port, self.slurmd_port = free_port(), free_port()
        self.slurmdbd_port, self.mysql_port = free_port(), free_port()
        if self.network is not None:
            self.network.create()
        self._start_munge(timeout)
        self._start_mariadb(timeout)
        self._write_configs()
        self._start_slurmdbd(timeout)
        self._start_slurmctld(timeout)
        self._start_slurmd(timeout)
        self._wait_accounting(timeout)

    def _spawn(self, name: str, cmd: list[str], log: Path, user: str | None = None
               ) -> subprocess.Popen:
        out = open(log, "ab")
        as_user = {} if user is None else {"user": user, "group": user, "extra_groups": []}
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env}, start_new_session=True,  # setsid
                **as_user,
            )
        finally:
            out.close()
        self._daemons.append(_Daemon(name, proc, log))
        logger.info("started %s (pid %d)", name, proc.pid)
        return proc

    def _start_munge(self, timeout: float) -> None:
        mdir = self.root / "munge"
        munge = pwd.getpwnam("munge")
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        os.chmod(mdir, 0o711)  # 700 is refused by slurm clients of other users; 711 works
        self.munge_socket = mdir / "munge.socket.2"
        log = mdir / "munged.log"
        cmd = [
            "munged", "-F", f"--socket={self.munge_socket}",
            f"--key-file={MUNGE_KEY}", f"--pid-file={mdir / 'munged.pid'}",
            f"--log-file={log}", f"--seed-file={mdir / 'munged.seed'}",
        ]
        # munged logs to its own file; the spawn log catches start-up errors before that.
        proc = self._spawn("munged", cmd, self.root / "log" / "munged.out", user="munge")
        _wait_for("munged", self.munge_socket.exists, timeout, proc, self.root / "log" / "munged.out")

    def _start_mariadb(self, timeout: float) -> None:
        data = self.root / "mysql" / "data"
        log = self.root / "log" / "mariadb.log"
        install = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, text=True,
        )
        if install.returncode != 0:
            raise ClusterUnavailable(f"mariadb-install-db failed:\n{install.stderr[-2000:]}")
        self.mysql_socket = self.root / "mysql" / "mysqld.sock"
        cmd = [
            "mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
            f"--socket={self.mysql_socket}", f"--port={self.mysql_port}",
            "--bind-address=127.0.0.1", f"--pid-file={self.root / 'mysql' / 'mysqld.pid'}",
            f"--log-error={log}",
            # A throw-away database reachable only from this machine: no grant checks, so
            # slurmdbd needs no user set-up. Small buffers keep start-up fast.
            "--skip-grant-tables", "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M",
        ]
        proc = self._spawn("mariadbd", cmd, self.root / "log" / "mariadbd.out")
        _wait_for("mariadbd", lambda: _port_open(self.mysql_port), timeout, proc, log)

    def _write_configs(self) -> None:
        r = self.root
        auth = f"socket={self.munge_socket},cred_expire={self.cred_expire_s}"
        ctld_addr = self.network.gateway if self.network is not None else "127.0.0.1"
        addrs = self.network.addresses if self.network is not None else ["127.0.0.1"]
        node_lines = "\n".join(
            f"NodeName={name} NodeAddr={addr} CPUs={self.cpus} "
            f"RealMemory={self.real_memory_mb} State=UNKNOWN"
            for name, addr in zip(self.node_names, addrs, strict=True))
        slurm_conf = f"""\
# Generated by tests/support/slurm_cluster.py: a throw-away test cluster.
ClusterName={self.cluster_name}
SlurmctldHost={self.hostname}({ctld_addr})
SlurmctldPort={self.slurmctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo={auth}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=30
# Schedule often so a requeued job restarts within seconds, not minutes.
SchedulerParameters=bf_interval=1,sched_interval=2,sched_min_interval=100000
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.slurmdbd_port}
AccountingStoragePass={self.munge_socket}
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
{node_lines}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        dbd_conf = f"""\
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost={self.hostname}
DbdAddr=127.0.0.1
DbdPort={self.slurmdbd_port}
SlurmUser=root
PidFile={r}/run/slurmdbd.pid
LogFile={r}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.mysql_port}
StorageUser=root
StorageLoc=slurm_acct_db
"""
        self.conf.write_text(slurm_conf)
        dbd = self.conf.with_name("slurmdbd.conf")
        dbd.write_text(dbd_conf)
        os.chmod(dbd, 0o600)  # slurmdbd refuses a config others can read

    def _start_slurmdbd(self, timeout: float) -> None:
        log = self.root / "log" / "slurmdbd.log"
        proc = self._spawn("slurmdbd", ["slurmdbd", "-D"], self.root / "log" / "slurmdbd.out")
        _wait_for("slurmdbd", lambda: _port_open(self.slurmdbd_port), timeout, proc, log)

    def _start_slurmctld(self, timeout: float) -> None:
        log = self.root / "log" / "slurmctld.log"
        proc = self._spawn(
            "slurmctld", ["slurmctld", "-D", "-f", str(self.conf)],
            self.root / "log" / "slurmctld.out",
        )
        _wait_for("slurmctld", lambda: _port_open(self.slurmctld_port), timeout, proc, log)

    def _start_slurmd(self, timeout: float) -> None:
        procs = []
        for name in self.node_names:
            cmd = ["slurmd", "-D", "-N", name, "-f", str(self.conf)]
            if self.network is not None:
                # nsenter, not `ip netns exec`: that remounts /sys, and slurmd then finds
                # no cgroup filesystem and refuses to start.
                cmd = ["nsenter", f"--net={self.network.netns_path(name)}", *cmd]
            procs.append(self._spawn(f"slurmd-{name}", cmd, self.root / "log" / f"{name}.out"))

        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            states = [s.rstrip("*") for s in out.split()]
            return len(states) == len(procs) and all(s == "idle" for s in states)

        log = self.root / "log" / f"slurmd-{self.node_names[0]}.log"
        _wait_for("slurmd (nodes idle)", idle, timeout, procs[0], log)

    def _wait_accounting(self, timeout: float) -> None:
        # slurmctld registers the cluster with slurmdbd on its own; sacct answers once it has.
        def registered() -> bool:
            out = self.run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster",
                           check=False, timeout=10)
            return self.cluster_name in out.split()

        _wait_for("accounting (sacctmgr list cluster)", registered, timeout, None,
                  self.root / "log" / "slurmdbd.log")

    # ----------------------------------------------------------------- shutdown

    def _cancel_all_jobs(self) -> None:
        try:
            self.run("scancel", "--full", f"--partition={self.partition}", check=False, timeout=20)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                if not self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).strip():
                    return
                time.sleep(0.5)
            logger.warning("jobs still listed after scancel; killing their steps by PID")
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("could not cancel jobs: %s", exc)

    @staticmethod
    def _kill_tree(pid: int) -> None:
        children = _children(pid)
        for p in [pid, *children]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def _terminate(daemon: _Daemon, grace: float = 15.0) -> None:
        proc = daemon.proc
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) ignored SIGTERM; sending SIGKILL", daemon.name, proc.pid)
            proc.kill()
            proc.wait(10)
        # Anything the daemon forked into its session (e.g. a helper) goes with it.
        for pid in _processes_in_session(proc.pid):
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (read from /proc), deepest last."""
    by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        by_parent.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="directory for all cluster state")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1,
                        help="N >= 2: each node in its own network namespace")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cluster = LocalSlurmCluster(Path(args.root), cpus=args.cpus, nodes=args.nodes)
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    with cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        while not stop:
            time.sleep(0.5)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
