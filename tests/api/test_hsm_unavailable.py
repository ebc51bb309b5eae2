"""The token becomes unreachable mid-service: UNAVAILABLE, nothing written, then recovery."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from vault.api.server import build_server
from vault.keys.hsm import HsmConfig
from vault.service import Vault
from vault.store import Store
from vault.testing import BreakableHsm
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc


@pytest.fixture
def setup(tmp_path: Path, hsm_config: HsmConfig) -> Iterator[tuple]:
    hsm = BreakableHsm(hsm_config)
    vault = Vault(Store(tmp_path / "vault.db"), hsm, tmp_path)
    server, port, _ = build_server(vault, "127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield hsm, vault, vault_pb2_grpc.TemplateVaultStub(channel)
    channel.close()
    server.stop(0)
    vault.close()


def _rows(path: Path) -> tuple[int, ...]:
    db = sqlite3.connect(path)
    try:
        return tuple(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                     for t in ("templates", "subjects", "pages", "blocks"))
    finally:
        db.close()


def test_requests_get_unavailable_and_nothing_is_written(setup, lfw) -> None:
    hsm, vault, stub = setup
    emb = lfw["emb"]
    stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128, threshold=0.9))
    stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id="a", embedding=emb[0].tolist()))
    before = _rows(vault.store.path)

    hsm.broken = True
    for call, request in [
        (stub.Enroll, pb.EnrollRequest(collection_id="c", subject_id="b", embedding=emb[1].tolist())),
        (stub.Match, pb.MatchRequest(collection_id="c", subject_id="a", embedding=emb[0].tolist())),
        (stub.DeleteSubject, pb.DeleteSubjectRequest(collection_id="c", subject_id="a")),
        (stub.CreateCollection, pb.CreateCollectionRequest(collection_id="d", dimension=8, threshold=0.5)),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "HSM unavailable" in err.value.details()
    assert _rows(vault.store.path) == before

    hsm.broken = False  # the token is back: service resumes without a restart
    assert stub.Match(pb.MatchRequest(collection_id="c", subject_id="a",
                                      embedding=emb[0].tolist())).matched
    stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id="b", embedding=emb[1].tolist()))
    assert stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count == 2
