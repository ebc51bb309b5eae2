"""The client package (client/, distribution ``vault-client``) installed alone in a fresh
venv enrolls, imports and matches against a real server; its retry policy resends only
idempotent calls."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import venv
from concurrent import futures
from importlib import metadata
from pathlib import Path

import grpc
import pytest

from vault.testing import ServerProcess

CLIENT = Path(__file__).resolve().parents[1] / "client"

SCRIPT = r"""
import random, sys
from vault_client import VaultClient

rng = random.Random(7)
D = 64
def unit(v):
    n = sum(x * x for x in v) ** 0.5
    return [x / n for x in v]
faces = {f"p{i}": unit([rng.gauss(0, 1) for _ in range(D)]) for i in range(4)}
def capture(face):
    return unit([x + rng.gauss(0, 0.3) / D ** 0.5 for x in face])

items = [(s, capture(f)) for s, f in faces.items() for _ in range(2)]  # two captures each
with VaultClient.from_env() as vault:
    vault.create_collection("pkg", dimension=D, threshold=0.8)
    print("first:", vault.import_templates("pkg", items).summary())
    print("again:", vault.import_templates("pkg", items).summary())
    print("count:", vault.get_collection("pkg").template_count)
    vault.enroll("pkg", "p9", unit([rng.gauss(0, 1) for _ in range(D)]))
    probe = capture(faces["p2"])
    print("verify:", vault.verify("pkg", "p2", probe), vault.verify("pkg", "p1", probe))
    print("identify:", [c.subject_id for c in vault.identify("pkg", probe, top_k=3)])
for name in ("numpy", "numba", "llvmlite", "faiss", "tenseal", "pkcs11", "vault"):
    try:
        __import__(name)
        print("present:", name)
    except ImportError:
        pass
"""


def test_client_package_alone_in_a_fresh_venv(tmp_path: Path, server: ServerProcess) -> None:
    source = tmp_path / "client"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                  "__pycache__"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # The client and what it depends on (grpcio, protobuf), at the versions in pip's cache.
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    str(source), f"grpcio=={metadata.version('grpcio')}",
                    f"protobuf=={metadata.version('protobuf')}"], check=True, timeout=300)
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], check=True,
                            capture_output=True, text=True).stdout.lower()
    for heavy in ("numpy", "numba", "faiss", "tenseal", "python-pkcs11"):
        assert heavy not in listed

    out = subprocess.run([python, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={"VAULT_TARGET": server.target, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "first: 8 new, 0 already stored, 0 failed" in lines
    assert "again: 0 new, 8 already stored, 0 failed" in lines
    assert "count: 8" in lines
    assert "verify: True False" in lines
    assert "identify: ['p2']" in lines
    assert not [line for line in lines if line.startswith("present:")]


# The retry policy, against a gRPC server that answers UNAVAILABLE twice before it works.
class _Flaky:
    def __init__(self) -> None:
        self.calls: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()

    def handler(self, method: str, response: bytes):  # type: ignore[no-untyped-def]
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self.lock:
                seen = self.calls.setdefault(method, [])
                seen.append(request)
                if len(seen) <= 2:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            return response
        return grpc.unary_unary_rpc_method_handler(handle)


@pytest.fixture
def vault_client_module():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(CLIENT))
    try:
        import vault_client
        yield vault_client
    finally:
        sys.path.remove(str(CLIENT))


def test_retries_resend_enroll_with_one_request_id_and_never_match(vault_client_module) -> None:  # type: ignore[no-untyped-def]
    from vault_client.v1 import vault_pb2 as pb

    flaky = _Flaky()
    handlers = {
        "Enroll": flaky.handler("Enroll", pb.EnrollResponse(template_id="t1").SerializeToString()),
        "Match": flaky.handler("Match", pb.MatchResponse(matched=True).SerializeToString()),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("vault.v1.TemplateVault", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with vault_client_module.VaultClient(f"127.0.0.1:{port}", timeout=20) as client:
            assert client.enroll("c", "s", [1.0, 0.0]).template_id == "t1"
            with pytest.raises(grpc.RpcError) as err:
                client.verify("c", "s", [1.0, 0.0])
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)
    enrolls = [pb.EnrollRequest.FromString(b) for b in flaky.calls["Enroll"]]
    assert len(enrolls) == 3 and len({e.request_id for e in enrolls}) == 1
    assert enrolls[0].request_id
    assert len(flaky.calls["Match"]) == 1
