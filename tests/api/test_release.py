"""What a credential may take out, against a real server: budgets per credential and
collection, purpose-bound identification and its audit trail, rate limits that a new
connection per call does not reset, and refused calls that cost no audit fsync each."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

Code = grpc.StatusCode
DIM = 16
RNG = np.random.default_rng(3)
FACES = RNG.standard_normal((4, DIM))


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"VAULT_SCORE_BUDGET": "5", "VAULT_VERIFY_BUDGET": "30"}  # 30/h: a burst of 5
    with ServerProcess(tmp_path_factory.mktemp("release") / "data", env=env) as server:
        with server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            for cid, purpose in (("a", False), ("b", False), ("cases", True)):
                stub.CreateCollection(pb.CreateCollectionRequest(
                    collection_id=cid, dimension=DIM, threshold=0.8, require_purpose=purpose))
                for i, face in enumerate(FACES):
                    stub.Enroll(pb.EnrollRequest(collection_id=cid, subject_id=f"p{i}",
                                                 embedding=face.tolist()))
        yield server


def _code(call, request) -> tuple[Code, str]:  # type: ignore[no-untyped-def]
    try:
        call(request, timeout=20)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return Code.OK, ""


def test_score_and_verification_budgets_are_per_credential_and_collection(budgeted) -> None:
    with budgeted.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        scored = pb.MatchRequest(collection_id="a", embedding=FACES[1].tolist(), release_scores=True)
        for _ in range(5):
            assert stub.Match(scored).scores_released
        code, msg = _code(stub.Match, scored)
        assert code == Code.RESOURCE_EXHAUSTED and "5 score releases per day" in msg
        # Decisions are not scores: still answered; another collection has its own budget.
        assert stub.Match(pb.MatchRequest(collection_id="a", embedding=FACES[1].tolist())).matched
        assert stub.Match(pb.MatchRequest(collection_id="b", embedding=FACES[1].tolist(),
                                          release_scores=True)).scores_released

        verify = pb.MatchRequest(collection_id="b", subject_id="p2", embedding=FACES[2].tolist())
        results = [_code(stub.Match, verify) for _ in range(8)]
        assert [c for c, _ in results[:5]] == [Code.OK] * 5
        assert all(c == Code.RESOURCE_EXHAUSTED and "30 1:1 verifications per hour" in m
                   for c, m in results[5:])


def test_a_score_budget_holds_under_parallel_requests(budgeted) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with budgeted.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="par", dimension=DIM,
                                                         threshold=0.8))
        stub.Enroll(pb.EnrollRequest(collection_id="par", subject_id="p0",
                                     embedding=FACES[0].tolist()))
        request = pb.MatchRequest(collection_id="par", embedding=FACES[0].tolist(),
                                  release_scores=True)
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: _code(stub.Match, request)[0], range(24)))
    assert codes.count(Code.OK) == 5
    assert codes.count(Code.RESOURCE_EXHAUSTED) == 19


def test_identification_needs_a_purpose_where_the_collection_says_so(budgeted) -> None:
    with budgeted.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        assert stub.GetCollection(pb.GetCollectionRequest(collection_id="cases")).require_purpose
        assert not stub.GetCollection(pb.GetCollectionRequest(collection_id="a")).require_purpose
        probe = FACES[3].tolist()
        code, msg = _code(stub.Match, pb.MatchRequest(collection_id="cases", embedding=probe))
        assert code == Code.FAILED_PRECONDITION and "requires a purpose" in msg
        for purpose in ("case 2026-113", "case 2026-113", "case 2026-200"):
            assert stub.Match(pb.MatchRequest(collection_id="cases", embedding=probe,
                                              purpose=purpose)).matched
        stub.Match(pb.MatchRequest(collection_id="cases", embedding=RNG.standard_normal(DIM).tolist(),
                                   purpose="case 2026-113"))
        # 1:1 needs none.
        assert stub.Match(pb.MatchRequest(collection_id="cases", subject_id="p3", embedding=probe)).matched

    def searches(*extra: str) -> str:
        done = subprocess.run([sys.executable, "-m", "vault", "audit", "searches", "--data-dir",
                               str(budgeted.data_dir), "--collection", "cases", *extra],
                              capture_output=True, text=True, check=True)
        return done.stdout

    out = searches("--purpose", "case 2026-113")
    assert "searches: 3" in out and "case 2026-200" not in out
    assert "purpose=case 2026-113: OK matched=2, OK no_match=1" in out
    assert "threshold=0.8" in out
    everything = searches()
    assert "searches: 5" in everything  # the refused one is recorded with its status too
    assert "purpose=-: FAILED_PRECONDITION=1" in everything
    # The purpose is in the hash-chained (signed) entries, not in a side table.
    db = sqlite3.connect(f"file:{budgeted.data_dir / 'audit.db'}?mode=ro", uri=True)
    details = [json.loads(d) for (d,) in db.execute(
        "SELECT detail FROM entries WHERE kind='response' AND collection_id='cases' AND detail!=''")]
    assert sum(d.get("purpose") == "case 2026-200" for d in details) == 1


def test_rate_limit_ignores_the_source_port_and_refusals_cost_no_audit_write(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", env={"VAULT_RATE_LIMIT": "0.2"})  # a burst of 0.4
    with server:
        with server.channel() as channel:
            assert _code(vault_pb2_grpc.TemplateVaultStub(channel).GetCollection,
                         pb.GetCollectionRequest(collection_id="x"))[0] == Code.RESOURCE_EXHAUSTED
        db = sqlite3.connect(f"file:{server.data_dir / 'audit.db'}?mode=ro", uri=True)
        before = db.execute("SELECT count(*) FROM entries").fetchone()[0]
        codes = []
        for _ in range(40):  # a new connection (a new source port) for every call
            with server.channel() as channel:
                codes.append(_code(vault_pb2_grpc.TemplateVaultStub(channel).GetCollection,
                                   pb.GetCollectionRequest(collection_id="x"))[0])
        assert codes == [Code.RESOURCE_EXHAUSTED] * 40
        # Not two entries (and two fsyncs) each: one batched "refused" entry per 10 s at most.
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] - before <= 2
        db.close()
    db = sqlite3.connect(f"file:{server.data_dir / 'audit.db'}?mode=ro", uri=True)
    counted = sum(c["count"] for (d,) in db.execute("SELECT detail FROM entries WHERE kind='refused'")
                  for c in json.loads(d)
                  if c["code"] == "RESOURCE_EXHAUSTED" and c["method"] == "GetCollection")
    db.close()
    assert counted == 41  # every refusal is on the record once the server closed its log


def test_release_settings_edited_under_a_running_vault_are_refused(vault) -> None:
    """Write access to vault.db while it serves: dropping the purpose requirement or
    lowering the threshold makes matches DATA_LOSS, not looser."""
    from vault.errors import DataLoss

    vault.create_collection("p", DIM, 0.8, require_purpose=True)
    vault.create_collection("t", DIM, 0.99)
    for cid in ("p", "t"):
        vault.enroll(cid, "p0", FACES[0].tolist())
    assert vault.identify("p", FACES[0].tolist(), purpose="case 1").matched
    db = sqlite3.connect(vault.store.path)
    (signed_threshold,) = db.execute("SELECT threshold FROM collections WHERE collection_id='t'").fetchone()
    with db:
        db.execute("UPDATE collections SET policy='' WHERE collection_id='p'")
        db.execute("UPDATE collections SET threshold=-1.0 WHERE collection_id='t'")
    db.close()
    with pytest.raises(DataLoss):
        vault.identify("p", FACES[0].tolist())
    with pytest.raises(DataLoss):  # giving a purpose skips no check
        vault.identify("p", FACES[0].tolist(), purpose="case 2")
    with pytest.raises(DataLoss):
        vault.identify("t", FACES[1].tolist())
    with pytest.raises(DataLoss):
        vault.identify("t", FACES[1].tolist(), purpose="case 3")
    with pytest.raises(DataLoss):
        vault.verify("t", "p0", FACES[1].tolist())
    # An enroller cannot use the lowered threshold to attach another face to p0.
    with pytest.raises(DataLoss):
        vault.enroll("t", "p0", FACES[1].tolist())
    db = sqlite3.connect(vault.store.path)
    with db:  # the writer puts the threshold back: the old MAC holds again, nothing was added
        db.execute("UPDATE collections SET threshold=? WHERE collection_id='t'",
                   (signed_threshold,))
    db.close()
    assert vault.get_collection("t").template_count == 1
    assert not vault.verify("t", "p0", FACES[1].tolist()).matched


def test_calls_on_unknown_collections_do_not_refill_a_spent_budget(vault, monkeypatch) -> None:
    """Budgets live in bounded memory; a caller that spent its 1:1 budget must not push its
    own bucket out by calling Match on made-up collection ids (found in review). The bound
    is made small here so that the attack needs 20 calls, not 10,000."""
    from vault.api import budget
    from vault.api.server import build_server

    original = budget.Budgets.__init__
    monkeypatch.setattr(budget.Budgets, "__init__",
                        lambda self, *a, **k: original(self, *a, **{**k, "max_keys": 8}))
    vault.create_collection("a", DIM, 0.8)
    vault.enroll("a", "p0", FACES[0].tolist())
    server, port, _ = build_server(vault, "127.0.0.1:0",
                                   budgets=budget.BudgetConfig(verify_per_hour=30))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            verify = pb.MatchRequest(collection_id="a", subject_id="p0",
                                     embedding=FACES[0].tolist())
            assert [_code(stub.Match, verify)[0] for _ in range(5)] == [Code.OK] * 5
            assert _code(stub.Match, verify)[0] == Code.RESOURCE_EXHAUSTED
            for k in range(20):
                fake = pb.MatchRequest(collection_id=f"made-up-{k}", subject_id="p0",
                                       embedding=FACES[0].tolist())
                assert _code(stub.Match, fake)[0] == Code.NOT_FOUND
            assert _code(stub.Match, verify)[0] == Code.RESOURCE_EXHAUSTED
    finally:
        server.stop(0).wait()
