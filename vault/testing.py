"""Helpers for tests and benchmarks: a real server in a subprocess, and a breakable HSM.

Kept in the package (as tink-py keeps its fakes) so that tests, benchmarks and later
fault-injection harnesses share them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vault.errors import HsmUnavailable
from vault.keys.hsm import Hsm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``vault serve`` in a child process, on 127.0.0.1, with its own data directory."""

    def __init__(self, data_dir: Path, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path or data_dir.parent / f"{data_dir.name}-server.log"
        self._env = {**os.environ, **(env or {})}
        self._env.pop("SOFTHSM2_CONF", None)  # the server provisions its own token
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vault", "serve", "--data-dir", str(self.data_dir),
             "--listen", self.target], stdout=log, stderr=subprocess.STDOUT, env=self._env)
        log.close()
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}: "
                                       f"{self.log_path.read_text()[-2000:]}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    time.sleep(0.2)
        self.stop()
        raise TimeoutError("server did not become healthy")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.proc = None

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BreakableHsm(Hsm):
    """A real HSM client that can be switched to fail like an unreachable token.

    The fault is the thing under test (requests must get UNAVAILABLE and write nothing);
    everything else goes to the real token.
    """

    broken = False

    def _call(self, fn):  # type: ignore[override]
        if self.broken:
            self._drop()
            raise HsmUnavailable("HSM unavailable: token not reachable")
        return super()._call(fn)
