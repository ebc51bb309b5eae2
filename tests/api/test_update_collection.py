"""UpdateCollection: the only way a threshold or purpose requirement changes (admin, audited),
against a real server with mutual TLS."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from vault.testing import CertificateAuthority, ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

Code = grpc.StatusCode
DIM = 16
RNG = np.random.default_rng(21)
FACE = RNG.standard_normal(DIM)
_U = FACE / np.linalg.norm(FACE)
_V = RNG.standard_normal(DIM)
_V = (_V - (_V @ _U) * _U) / np.linalg.norm(_V - (_V @ _U) * _U)
PROBE = 0.65 * _U + np.sqrt(1 - 0.65 ** 2) * _V  # cosine 0.65: rejected at 0.8, accepted at 0.5


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[tuple[ServerProcess, CertificateAuthority]]:
    root = tmp_path_factory.mktemp("update")
    pki = CertificateAuthority(root / "pki")
    for name, roles in (("enroll-svc", ("enroller",)), ("gate", ("matcher",))):
        pki.issue(name, roles)
    with ServerProcess(root / "data", pki=pki, env={"VAULT_RATE_LIMIT": "0"}) as server:
        with server.channel() as channel:
            vault_pb2_grpc.TemplateVaultStub(channel).CreateCollection(
                pb.CreateCollectionRequest(collection_id="doors", dimension=DIM, threshold=0.8))
        vault_pb2_grpc.TemplateVaultStub(pki.channel(server.target, "enroll-svc")).Enroll(
            pb.EnrollRequest(collection_id="doors", subject_id="p0", embedding=FACE.tolist()))
        yield server, pki


def _code(call, request) -> Code:  # type: ignore[no-untyped-def]
    try:
        call(request, timeout=30)
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


def test_only_an_admin_changes_the_threshold_and_it_is_audited(world, tmp_path: Path) -> None:
    server, pki = world
    cosine = float(FACE @ PROBE / np.linalg.norm(FACE) / np.linalg.norm(PROBE))
    assert abs(cosine - 0.65) < 1e-9
    gate = vault_pb2_grpc.TemplateVaultStub(pki.channel(server.target, "gate"))
    identify = pb.MatchRequest(collection_id="doors", embedding=PROBE.tolist())
    assert not gate.Match(identify, timeout=30).matched
    lower = pb.UpdateCollectionRequest(collection_id="doors", threshold=0.5)
    assert _code(gate.UpdateCollection, lower) == Code.PERMISSION_DENIED
    assert not gate.Match(identify, timeout=30).matched
    with server.channel() as channel:
        admin = vault_pb2_grpc.TemplateVaultStub(channel)
        updated = admin.UpdateCollection(lower, timeout=30)
        assert abs(updated.threshold - 0.5) < 1e-6 and not updated.require_purpose
        assert [c.subject_id for c in gate.Match(identify, timeout=30).candidates] == ["p0"]
        # The purpose requirement, alone: the threshold stays.
        admin.UpdateCollection(pb.UpdateCollectionRequest(collection_id="doors",
                                                          require_purpose=True), timeout=30)
        assert _code(gate.Match, identify) == Code.FAILED_PRECONDITION
        with_purpose = pb.MatchRequest(collection_id="doors", embedding=PROBE.tolist(),
                                       purpose="case 17")
        assert gate.Match(with_purpose, timeout=30).matched
        for bad in (pb.UpdateCollectionRequest(collection_id="doors"),
                    pb.UpdateCollectionRequest(collection_id="doors", threshold=1.5),
                    pb.UpdateCollectionRequest(collection_id="doors", threshold=float("nan"))):
            assert _code(admin.UpdateCollection, bad) == Code.INVALID_ARGUMENT
        assert _code(admin.UpdateCollection, pb.UpdateCollectionRequest(
            collection_id="nowhere", threshold=0.9)) == Code.NOT_FOUND
        info = admin.GetCollection(pb.GetCollectionRequest(collection_id="doors"), timeout=30)
        assert abs(info.threshold - 0.5) < 1e-6 and info.require_purpose
    for name in ("audit.db", "audit.db-wal"):
        if (server.data_dir / name).exists():
            shutil.copy(server.data_dir / name, tmp_path / name)
    db = sqlite3.connect(tmp_path / "audit.db")
    rows = db.execute("SELECT actor, outcome, detail FROM entries WHERE method='UpdateCollection' "
                      "AND kind='response'").fetchall()
    db.close()
    ok = [json.loads(detail) for actor, outcome, detail in rows if outcome == "OK"]
    assert {"threshold": 0.5} in ok and {"require_purpose": True} in ok
    assert all(actor == "admin" for actor, outcome, _ in rows if outcome == "OK")
