"""``--health-listen``: under mutual TLS on any port, a plaintext loopback listener answers
grpc.health (what the image's HEALTHCHECK runs) and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from vault.testing import CertificateAuthority, ServerProcess, free_port
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc


def _vault(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vault", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env}, check=False)


def test_health_listener_under_mutual_tls(tmp_path: Path) -> None:
    port = free_port()
    pki = CertificateAuthority(tmp_path / "pki")
    with ServerProcess(tmp_path / "data", pki=pki,
                       args=["--health-listen", f"127.0.0.1:{port}"]) as server:
        # The API port needs a client certificate: a plaintext health check there fails.
        plain = _vault("health", "--target", server.target)
        assert plain.returncode == 3
        out = _vault("health", VAULT_HEALTH_LISTEN=f"127.0.0.1:{port}")
        assert out.returncode == 0 and out.stdout.strip() == "SERVING", out.stderr
        out = _vault("health", "--target", f"127.0.0.1:{port}", "--service", "vault.v1.Integrity")
        assert out.returncode == 0, out.stderr
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as err:  # only health on this listener
                vault_pb2_grpc.TemplateVaultStub(channel).GetCollection(
                    pb.GetCollectionRequest(collection_id="c"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    out = _vault("health", "--target", f"127.0.0.1:{port}")  # stopped: unreachable, exit 3
    assert out.returncode == 3 and "cannot reach the vault" in out.stderr


def test_health_listener_must_be_loopback(tmp_path: Path) -> None:
    out = _vault("serve", "--data-dir", str(tmp_path / "d"), "--health-listen", "0.0.0.0:50052")
    assert out.returncode == 2
    assert "--health-listen 0.0.0.0:50052: the health listener is plaintext" in out.stderr
