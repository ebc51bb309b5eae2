"""Mutual TLS and roles, against a real server with its own CA; per-client rate limits."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from vault.api import access
from vault.domain.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from vault.testing import CertificateAuthority, ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

Code = grpc.StatusCode
DIM = 16


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[ServerProcess, CertificateAuthority]]:
    root = tmp_path_factory.mktemp("mtls")
    pki = CertificateAuthority(root / "pki")
    for name, roles in (("enroll-svc", ("enroller",)), ("gate-svc", ("matcher",)),
                        ("both-svc", ("enroller", "matcher")), ("tuning", ("analyst",)),
                        ("nobody", ())):
        pki.issue(name, roles)
    server = ServerProcess(root / "data", pki=pki, env={"VAULT_RATE_LIMIT": "0",
                                                        "VAULT_AUDIT_REFUSED_INTERVAL": "0"})
    with server:
        with server.channel() as admin:
            vault_pb2_grpc.TemplateVaultStub(admin).CreateCollection(
                pb.CreateCollectionRequest(collection_id="gate", dimension=DIM, threshold=0.8))
        yield server, pki


def _stub(server: ServerProcess, pki: CertificateAuthority, name: str | None):  # type: ignore[no-untyped-def]
    return vault_pb2_grpc.TemplateVaultStub(pki.channel(server.target, name))


def _code(call, request) -> tuple[Code, str]:  # type: ignore[no-untyped-def]
    try:
        call(request, timeout=20)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return Code.OK, ""


FACE = np.random.default_rng(0).standard_normal(DIM).astype(np.float32)


def test_each_rpc_checks_the_role_in_the_client_certificate(tls_server) -> None:
    server, pki = tls_server
    enroll = pb.EnrollRequest(collection_id="gate", subject_id="ann", embedding=FACE)
    match = pb.MatchRequest(collection_id="gate", subject_id="ann", embedding=FACE)
    create = pb.CreateCollectionRequest(collection_id="other", dimension=DIM, threshold=0.5)
    delete = pb.DeleteSubjectRequest(collection_id="gate", subject_id="ann")
    get = pb.GetCollectionRequest(collection_id="gate")
    enroller, matcher = _stub(server, pki, "enroll-svc"), _stub(server, pki, "gate-svc")
    admin, nobody = _stub(server, pki, "admin"), _stub(server, pki, "nobody")
    assert _code(enroller.Enroll, enroll)[0] == Code.OK
    assert _code(matcher.Match, match)[0] == Code.OK
    for stub, call, request, role in ((matcher, "Enroll", enroll, "enroller"),
                                      (enroller, "Match", match, "matcher"),
                                      (enroller, "CreateCollection", create, "admin"),
                                      (matcher, "DeleteSubject", delete, "admin"),
                                      (admin, "Match", match, "matcher"),
                                      (nobody, "GetCollection", get, "admin")):
        code, details = _code(getattr(stub, call), request)
        assert code == Code.PERMISSION_DENIED, (call, code)
        assert f"needs the role {role}" in details or "needs the role" in details
    code, details = _code(nobody.GetCollection, get)
    assert "this client certificate has: none" in details
    assert _code(_stub(server, pki, "both-svc").Match, match)[0] == Code.OK
    assert _code(admin.GetCollection, get)[0] == Code.OK
    assert _code(admin.DeleteSubject, delete)[0] == Code.OK


def test_scores_leave_only_for_the_analyst_role(tls_server) -> None:
    server, pki = tls_server
    _code(_stub(server, pki, "enroll-svc").Enroll,
          pb.EnrollRequest(collection_id="gate", subject_id="sam", embedding=FACE))
    probe = pb.MatchRequest(collection_id="gate", subject_id="sam", embedding=FACE)
    matcher, analyst = _stub(server, pki, "gate-svc"), _stub(server, pki, "tuning")
    decision = matcher.Match(probe, timeout=20)
    assert decision.matched and not decision.scores_released and decision.candidates[0].score == 0
    asked = pb.MatchRequest(collection_id="gate", subject_id="sam", embedding=FACE,
                            release_scores=True)
    code, details = _code(matcher.Match, asked)
    assert code == Code.PERMISSION_DENIED and "release_scores needs the role analyst" in details
    scored = analyst.Match(asked, timeout=20)
    assert scored.scores_released and 0.98 <= scored.candidates[0].score <= 1.0
    assert scored.candidates[0].score == round(scored.candidates[0].score, 2)


def test_no_certificate_or_a_foreign_one_never_gets_in(tls_server, tmp_path) -> None:
    server, pki = tls_server
    # The server requires a client certificate: the handshake itself fails.
    code, _ = _code(_stub(server, pki, None).GetCollection, pb.GetCollectionRequest(collection_id="gate"))
    assert code == Code.UNAVAILABLE
    other = CertificateAuthority(tmp_path / "other", name="someone else's CA")
    other.issue("intruder", ("admin",))
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(),
                                         (other.root / "intruder.key").read_bytes(),
                                         (other.root / "intruder.crt").read_bytes())
    with grpc.secure_channel(server.target, creds) as channel:
        code, _ = _code(vault_pb2_grpc.TemplateVaultStub(channel).GetCollection,
                        pb.GetCollectionRequest(collection_id="gate"))
    assert code == Code.UNAVAILABLE


def test_the_audit_log_names_the_certificate(tls_server) -> None:
    server, pki = tls_server
    _code(_stub(server, pki, "gate-svc").Enroll,
          pb.EnrollRequest(collection_id="gate", subject_id="x", embedding=FACE))
    db = sqlite3.connect(f"file:{server.data_dir / 'audit.db'}?mode=ro", uri=True)
    # Refused before it ran: counted into a "refused" entry (no fsync per refused call).
    counts = [c for (detail,) in db.execute("SELECT detail FROM entries WHERE kind='refused'")
              for c in json.loads(detail)]
    assert any((c["actor"], c["method"], c["code"]) == ("gate-svc", "Enroll", "PERMISSION_DENIED")
               for c in counts)


def test_a_call_without_a_verified_certificate_is_unauthenticated() -> None:
    """Behind a TLS listener a call always carries a verified certificate; should one arrive
    without (a misconfigured listener), the RPC layer still refuses it."""
    context = SimpleNamespace(auth_context=lambda: {"transport_security_type": [b"ssl"]},
                              peer=lambda: "ipv4:127.0.0.1:1")
    with pytest.raises(Unauthenticated, match="client certificate"):
        access.caller(context, tls=True)  # type: ignore[arg-type]
    assert access.caller(context, tls=False).roles == access.ROLES  # loopback default
    with pytest.raises(PermissionDenied):
        access.authorize(access.Caller("x", frozenset({"matcher"})), "RotateMasterKey")


def test_rate_limit_per_client() -> None:
    now = [0.0]
    limiter = access.RateLimiter(5, clock=lambda: now[0])
    for _ in range(10):  # a burst of twice the rate
        limiter.take("a")
    with pytest.raises(ResourceExhausted, match="retry in 200 ms"):
        limiter.take("a")
    limiter.take("b")  # another client is not affected
    now[0] += 0.2
    limiter.take("a")
    with pytest.raises(ResourceExhausted):
        limiter.take("a")


def test_rate_limit_over_grpc(tmp_path) -> None:
    with ServerProcess(tmp_path / "data", env={"VAULT_RATE_LIMIT": "5"}) as server, \
            server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        codes = [_code(stub.GetCollection, pb.GetCollectionRequest(collection_id="none"))
                 for _ in range(30)]
        limited = [d for c, d in codes if c == Code.RESOURCE_EXHAUSTED]
        assert limited and "rate limit of 5 calls/s per client" in limited[0]
        time.sleep(1.0)
        assert _code(stub.GetCollection, pb.GetCollectionRequest(collection_id="none"))[0] == Code.NOT_FOUND
