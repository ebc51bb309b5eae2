"""Helpers for tests and benchmarks: a real server in a subprocess, and a breakable HSM.

Kept in the package (as tink-py keeps its fakes) so that tests, benchmarks and later
fault-injection harnesses share them.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vault.custody import default_hsm_dir
from vault.domain.errors import HsmUnavailable
from vault.keys.hsm import Hsm, HsmConfig
from vault.keys.roles import HsmRoles


def stress() -> bool:
    """True under ``make stress`` (VAULT_STRESS=1): tests run their long versions."""
    return os.environ.get("VAULT_STRESS") == "1"


def scaled(default: int, long: int) -> int:
    """A count for the default test run, or its long version under ``make stress``."""
    return long if stress() else default


def record_figures(name: str, figures: dict[str, Any]) -> None:
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
        return int(s.getsockname()[1])


class ServerProcess:
    """``vault serve`` in a child process, on 127.0.0.1, with its own data directory and
    its own SoftHSM token store outside it (``hsm_dir``; default ``<data_dir>-hsm``, the
    server's own default, which ``hsm_dir=None`` leaves to the server to pick)."""

    def __init__(self, data_dir: Path, log_path: Path | None = None,
                 env: dict[str, str] | None = None, args: list[str] | None = None,
                 pki: CertificateAuthority | None = None,
                 hsm_dir: Path | None = None) -> None:
        self.data_dir = data_dir
        self.hsm_dir = hsm_dir or default_hsm_dir(data_dir)
        self.pki = pki
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path or data_dir.parent / f"{data_dir.name}-server.log"
        self._env = dict(os.environ)
        self._env.pop("SOFTHSM2_CONF", None)  # the server provisions its own token...
        self._env.update(env or {})  # ...unless the test points it at one
        self._env.setdefault("VAULT_HSM_CHECK_INTERVAL", "0.5")
        self._args = list(args or [])
        if hsm_dir is not None:
            self._args += ["--hsm-dir", str(hsm_dir)]
        if pki is not None:  # mutual TLS, with an admin client for the harness itself
            cert, key = pki.issue("vault-server", server=True)
            pki.issue("admin", ("admin",))
            self._args += ["--tls-cert", str(cert), "--tls-key", str(key),
                           "--tls-client-ca", str(pki.ca)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, serving: bool = True) -> Self:
        """Start and wait until health says SERVING (or, with ``serving=False``, until
        health answers at all: a server whose HSM is out reports NOT_SERVING)."""
        proc = self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            status = self.health(timeout=1)
            if status == health_pb2.HealthCheckResponse.SERVING or (not serving and status is not None):
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("server did not become healthy")

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to serve."""
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vault", "serve", "--data-dir", str(self.data_dir),
                 "--listen", self.target, *self._args],
                stdout=log, stderr=subprocess.STDOUT, env=self._env)
        return self.proc

    def health(self, timeout: float = 2.0) -> int | None:
        """The overall health status, or None when the server does not answer."""
        with self.channel() as channel:
            try:
                status: int = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout).status
                return status
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
        """A channel to the server (with ``pki``: as its ``admin`` client)."""
        if self.pki is not None:
            return self.pki.channel(self.target, "admin")
        return grpc.insecure_channel(self.target)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def postgres_bin() -> Path:
    """The directory of PostgreSQL's server binaries (Debian's ``postgresql`` package puts
    them in /usr/lib/postgresql/MAJOR/bin). Missing binaries are an error, not a skip:
    CI installs them (hsm/install-system-deps.sh)."""
    override = os.environ.get("VAULT_PG_BIN")
    found = [Path(override)] if override else sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
        if p.parent.name.isdigit() else 0)
    found += [Path(shutil.which("initdb") or "/nonexistent").parent]
    for directory in found:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    raise RuntimeError("PostgreSQL's initdb and pg_ctl were not found: install the "
                       "`postgresql` package (make setup runs hsm/install-system-deps.sh)")


class PostgresServer:
    """A real PostgreSQL server for tests: ``initdb`` into a fresh temporary directory,
    listening on 127.0.0.1 at a free port, its unix socket in that directory, trust
    authentication for the one local user ``vault``. PostgreSQL refuses to run as root, so
    under uid 0 it runs as Debian's unprivileged ``postgres`` user. :meth:`close` stops it
    (also at interpreter exit) and removes the directory."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        # Not under pytest's root-only temp directory: the server's user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="vault-pg-"))
        self.data, self.sockets, self.log = self.root / "data", self.root / "run", self.root / "pg.log"
        self.sockets.mkdir()
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user is not None:
            shutil.chown(self.root, self.user)
            shutil.chown(self.sockets, self.user)
        self._running = False
        atexit.register(self.close)

    def _run(self, *cmd: str) -> None:
        as_user = ["runuser", "-u", self.user, "--"] if self.user else []
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {done.stderr.strip()[-2000:]}")

    def start(self) -> Self:
        """initdb (the first time), then start and wait until it accepts connections."""
        if not self.data.exists():
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "vault",
                      "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                   "-c fsync=on -c synchronous_commit=on -c shared_buffers=32MB "
                   "-c max_connections=60")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "-o", options, "start")
        self._running = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as a crash, without a checkpoint)."""
        if self._running:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
            self._running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://vault@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = name or f"v{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class BreakableHsm:
    """A real HSM client that can be switched to fail like an unreachable token.

    The fault is the thing under test (requests must get UNAVAILABLE and write nothing);
    everything else goes to the real token. It implements the HSM's roles
    (:mod:`vault.keys.roles`) by delegating to a :class:`vault.keys.hsm.Hsm`, so the vault
    takes it where it takes the real one.
    """

    def __init__(self, config: HsmConfig) -> None:
        self._real = Hsm(config)
        self.broken = False

    def _up(self) -> Hsm:
        """The real client, unless broken: then its session is dropped, as a lost token's."""
        if self.broken:
            self._real.close()
            raise HsmUnavailable("HSM unavailable: token not reachable")
        return self._real

    # Mac
    def hmac(self, name: str, data: bytes, version: int = 1) -> bytes:
        return self._up().hmac(name, data, version)

    def hmac_many(self, name: str, datas: Sequence[bytes], version: int = 1) -> list[bytes]:
        return self._up().hmac_many(name, datas, version)

    # KeyWrap
    def wrap(self, secret: bytes, aad: bytes, kek_version: int | None = None) -> bytes:
        return self._up().wrap(secret, aad, kek_version)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        return self._up().unwrap(blob, aad)

    def rewrap(self, blob: bytes, aad: bytes, version: int | None = None) -> bytes:
        return self._up().rewrap(blob, aad, version)

    def wrapped_version(self, blob: bytes) -> int:
        return self._real.wrapped_version(blob)  # reads the blob's header, not the token

    def current_kek_version(self) -> int:
        return self._up().current_kek_version()

    def create_kek(self) -> int:
        return self._up().create_kek()

    def destroy_kek(self, version: int) -> None:
        self._up().destroy_kek(version)

    def versions(self, name: str) -> list[int]:
        return self._up().versions(name)

    # Signer
    def ensure_audit_key(self) -> bool:
        return self._up().ensure_audit_key()

    def audit_sign(self, data: bytes) -> bytes:
        return self._up().audit_sign(data)

    def audit_public_key(self) -> bytes:
        return self._up().audit_public_key()

    # Counters
    def counter(self, counter_label: str) -> int | None:
        return self._up().counter(counter_label)

    def has_counters(self) -> bool:
        return self._up().has_counters()

    def set_counter(self, counter_label: str, value: int, backward: bool = False) -> int:
        return self._up().set_counter(counter_label, value, backward)

    # Token
    def ping(self) -> None:
        self._up().ping()

    def close(self) -> None:
        self._real.close()  # closing works with the token gone, as the real one's does

    def random(self, nbytes: int) -> bytes:
        return self._up().random(nbytes)

    def ensure_keys(self, create: bool = True) -> list[str]:
        return self._up().ensure_keys(create)

    def key_attributes(self, key_label: str) -> dict[str, bool]:
        return self._up().key_attributes(key_label)


def _roles(hsm: BreakableHsm) -> HsmRoles:
    return hsm  # checked by mypy: the fake implements every role the vault is given


class CertificateAuthority:
    """A throwaway certificate authority for mutual-TLS tests: a server certificate for
    127.0.0.1 and localhost, and client certificates whose OU values are roles."""

    def __init__(self, root: Path, name: str = "vault test CA") -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self._ca = self._certificate(name, self._ca_key, None, ca=True)
        self.ca = self._write("ca.pem", self._pem(self._ca))

    @staticmethod
    def _pem(cert: Any) -> bytes:
        from cryptography.hazmat.primitives import serialization
        return bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def _certificate(self, common_name: str, key: Any, issuer: Any, ca: bool = False,
                     units: tuple[str, ...] = (), server: bool = False) -> Any:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u) for u in units]
        subject = x509.Name(attrs)
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer.subject if issuer is not None else subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(self._ca_key if issuer is not None else key, hashes.SHA256())

    def issue(self, name: str, units: tuple[str, ...] = (), server: bool = False) -> tuple[Path, Path]:
        """(certificate, key) files for ``name``; ``units`` become OU values (roles)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._certificate(name, key, self._ca, units=units, server=server)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return self._write(f"{name}.crt", self._pem(cert)), self._write(f"{name}.key", key_pem)

    def channel(self, target: str, name: str | None) -> grpc.Channel:
        """A channel presenting ``name``'s certificate (none with ``name=None``)."""
        cert = key = None
        if name is not None:
            cert, key = (self.root / f"{name}.crt").read_bytes(), (self.root / f"{name}.key").read_bytes()
        creds = grpc.ssl_channel_credentials(self.ca.read_bytes(), key, cert)
        return grpc.secure_channel(target, creds)
