"""Helpers for tests and benchmarks: a real server in a subprocess, and a breakable HSM.

Kept in the package (as tink-py keeps its fakes) so that tests, benchmarks and later
fault-injection harnesses share them.
"""

from __future__ import annotations

import json
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


def stress() -> bool:
    """True under ``make stress`` (VAULT_STRESS=1): tests run their long versions."""
    return os.environ.get("VAULT_STRESS") == "1"


def scaled(default: int, long: int) -> int:
    """A count for the default test run, or its long version under ``make stress``."""
    return long if stress() else default


def record_figures(name: str, figures: dict) -> None:
    """Write a test's measured figures to $VAULT_FIGURES_DIR/NAME.json (if set), for
    docs/RELIABILITY.md. Figures hold counts and timings only, never biometric data."""
    out = os.environ.get("VAULT_FIGURES_DIR")
    if not out:
        return
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "stress": stress(), **figures}, indent=2) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``vault serve`` in a child process, on 127.0.0.1, with its own data directory."""

    def __init__(self, data_dir: Path, log_path: Path | None = None,
                 env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path or data_dir.parent / f"{data_dir.name}-server.log"
        self._env = dict(os.environ)
        self._env.pop("SOFTHSM2_CONF", None)  # the server provisions its own token...
        self._env.update(env or {})  # ...unless the test points it at one
        self._env.setdefault("VAULT_HSM_CHECK_INTERVAL", "0.5")
        self._args = list(args or [])
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0, serving: bool = True) -> ServerProcess:
        """Start and wait until health says SERVING (or, with ``serving=False``, until
        health answers at all: a server whose HSM is out reports NOT_SERVING)."""
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            status = self.health(timeout=1)
            if status == health_pb2.HealthCheckResponse.SERVING or (not serving and status is not None):
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("server did not become healthy")

    def launch(self) -> None:
        """Start the process without waiting for it to serve."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vault", "serve", "--data-dir", str(self.data_dir),
             "--listen", self.target, *self._args],
            stdout=log, stderr=subprocess.STDOUT, env=self._env)
        log.close()

    def health(self, timeout: float = 2.0) -> int | None:
        """The overall health status, or None when the server does not answer."""
        with grpc.insecure_channel(self.target) as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout).status
            except grpc.RpcError:
                return None

    def wait_health(self, status: int, timeout: float = 30.0) -> None:
        """Wait until health reports ``status``; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health() == status:
                return
            time.sleep(0.2)
        raise TimeoutError(f"health did not become {status}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (crash tests)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

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
