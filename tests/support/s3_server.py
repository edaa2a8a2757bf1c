"""A real S3-compatible server on 127.0.0.1 for tests (moto in server mode, from PyPI), and a
TCP proxy in front of it that drops connections in the middle of responses.

``S3Server.start()`` runs ``python -m moto.server`` on a free port, waits until it answers,
and ``stop()`` ends that process by its PID. Clients reach it through the usual AWS
environment (:meth:`S3Server.env`: fake keys, a region and ``AWS_ENDPOINT_URL``), exactly as
a user reaches MinIO or Ceph.

:class:`DroppingProxy` forwards 127.0.0.1:port to the server and, every ``drop_every`` bytes
of responses, closes the client's connection mid-stream (half a response delivered): the
fault an overloaded object store or a flaky network produces. It counts the drops.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from scaletrain.core.dist_env import free_port


def _wait_port(port: int, proc: subprocess.Popen | None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the S3 server exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port} within {timeout} s")


class S3Server:
    """moto's S3 server, one process, stopped by PID."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The AWS environment a client needs (moto takes any keys)."""
        return {
            "AWS_ACCESS_KEY_ID": "scaletrain-test",
            "AWS_SECRET_ACCESS_KEY": "scaletrain-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
        }

    def start(self) -> S3Server:
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            _wait_port(self.port, self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def new_bucket(self) -> str:
        """A fresh bucket, so tests sharing the server never see each other's objects."""
        import fsspec

        name = f"t-{uuid.uuid4().hex[:12]}"
        env = self.env()
        fs = fsspec.filesystem("s3", endpoint_url=self.endpoint, key=env["AWS_ACCESS_KEY_ID"],
                               secret=env["AWS_SECRET_ACCESS_KEY"])
        fs.mkdir(name)
        return name


class DroppingProxy:
    """127.0.0.1:port -> the server, closing the connection carrying the response in which
    each ``drop_every``-th byte falls (after forwarding part of it)."""

    def __init__(self, upstream_port: int, drop_every: int) -> None:
        self.upstream_port = upstream_port
        self.drop_every = drop_every
        self.drops = 0
        self._since_drop = 0
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.enabled = True
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, response: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if response and self.enabled:
                    with self._lock:
                        self._since_drop += len(data)
                        drop = self._since_drop >= self.drop_every
                        if drop:
                            self._since_drop = 0
                            self.drops += 1
                    if drop:
                        dst.sendall(data[: len(data) // 2])  # half a chunk, then cut
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
