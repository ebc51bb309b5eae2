"""A row forged in the database of a running vault is never signed afresh.

Mallory, who can write the database, gives her own template row Alice's subject HMAC
(both are in the table). The MAC no longer holds, so a 1:1 as Alice answers DATA_LOSS;
but a key rotation re-signs every row it moves, and a journal checkpoint every row it
moves into a block: they once gave the forged row a valid MAC, and from then on
Mallory's face verified as Alice, before and after a restart. Tried on a real server
with the rotation an admin starts (templates imported into blocks, and enrolled into
journal pages which the rotation checkpoints first) and with a quiet journal that
maintenance checkpoints on its own.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from vault.domain.records import DELETED, LIVE
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

Code = grpc.StatusCode
ENV = {"VAULT_RATE_LIMIT": "0", "VAULT_MAINTENANCE_INTERVAL": "0.5"}


def _faces(lfw) -> list[np.ndarray]:
    emb, ids = lfw["emb"], lfw["ids"]
    return [emb[np.flatnonzero(ids == p)[0]] for p in np.unique(ids)[:6]]


def _forge(data: Path) -> None:
    """Mallory's row (the second stored) takes Alice's subject HMAC (the first's)."""
    db = sqlite3.connect(data / "vault.db", timeout=30)
    try:
        rows = db.execute("SELECT template_id, subject_hmac FROM templates "
                          "WHERE collection_id='c' ORDER BY rowid").fetchall()
        (_, alice), (mallory, _) = rows[0], rows[1]
        with db:
            db.execute("UPDATE templates SET subject_hmac=? WHERE template_id=?", (alice, mallory))
    finally:
        db.close()


def _as_alice(stub, face: np.ndarray) -> tuple[Code, bool]:  # type: ignore[no-untyped-def]
    """Mallory's face presented as Alice (1:1): the status, and whether it matched."""
    try:
        reply = stub.Match(pb.MatchRequest(collection_id="c", subject_id="alice",
                                           embedding=face.tolist()), timeout=60)
    except grpc.RpcError as err:
        return err.code(), False
    return Code.OK, reply.matched


def _names(stub, face: np.ndarray) -> tuple[Code, list[str]]:  # type: ignore[no-untyped-def]
    try:
        reply = stub.Match(pb.MatchRequest(collection_id="c", embedding=face.tolist(), top_k=3),
                           timeout=60)
    except grpc.RpcError as err:
        return err.code(), []
    return Code.OK, [c.subject_id for c in reply.candidates]


def _until(condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["rotation of blocks", "rotation of a journal",
                                 "quiet journal checkpoint"])
def test_a_forged_row_is_never_signed_afresh(tmp_path: Path, lfw, how: str) -> None:
    faces = _faces(lfw)
    names = ["alice", "mallory"] + [f"p{k}" for k in range(len(faces) - 2)]
    env = dict(ENV, VAULT_JOURNAL_QUIET="1" if how == "quiet journal checkpoint" else "0")
    data = tmp_path / "data"
    with ServerProcess(data, env=env) as server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128,
                                                         threshold=0.97))
        if how == "rotation of blocks":
            batch = pb.ImportTemplatesRequest(collection_id="c", items=[
                pb.ImportItem(subject_id=s, embedding=f.tolist()) for s, f in zip(names, faces)])
            assert all(r.code == 0 for resp in stub.ImportTemplates(iter([batch]))
                       for r in resp.results)
        else:
            for s, f in zip(names, faces):
                stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=s, embedding=f.tolist()))
        assert _as_alice(stub, faces[1]) == (Code.OK, False)
        _forge(data)
        assert _as_alice(stub, faces[1]) == (Code.DATA_LOSS, False)  # caught at match

        if how == "quiet journal checkpoint":
            # The journal, quiet for a second, is checkpointed by maintenance: not this
            # one, whose refusal stops the collection.
            def refused() -> bool:
                try:
                    stub.GetCollection(pb.GetCollectionRequest(collection_id="c"))
                except grpc.RpcError as err:
                    return err.code() == Code.DATA_LOSS
                return False
            _until(refused)
        else:
            job = stub.RotateCollectionKey(pb.RotateCollectionKeyRequest(collection_id="c"))
            _until(lambda: stub.GetKeyJob(pb.GetKeyJobRequest(job_id=job.job_id)).state
                   in (pb.KeyJob.STATE_DONE, pb.KeyJob.STATE_FAILED))
        for face in (faces[1], faces[0]):
            code, matched = _as_alice(stub, face)
            assert code == Code.DATA_LOSS and not matched
            assert _names(stub, face)[0] == Code.DATA_LOSS  # the collection stops, loudly
        if how != "quiet journal checkpoint":
            assert stub.GetKeyJob(pb.GetKeyJobRequest(job_id=job.job_id)).state == \
                pb.KeyJob.STATE_FAILED  # and the new key version never served

    # Restarted on the same directory: still caught, never Alice.
    with ServerProcess(data, env=env) as server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        code, matched = _as_alice(stub, faces[1])
        assert code == Code.DATA_LOSS and not matched
        code, named = _names(stub, faces[1])
        assert code == Code.DATA_LOSS and "alice" not in named


def test_a_forged_row_is_not_made_a_valid_tombstone_by_a_deletion(tmp_path: Path, lfw) -> None:
    """Alice's deletion tombstones her own rows; the row forged to name her keeps its
    broken MAC (a fresh one would make its place valid) and the collection stops."""
    faces = _faces(lfw)[:2]
    data = tmp_path / "data"
    with ServerProcess(data, env=ENV) as server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128,
                                                         threshold=0.97))
        for s, f in zip(("alice", "mallory"), faces):
            stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=s, embedding=f.tolist()))
        _forge(data)
        stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id="c", subject_id="alice"))
        with pytest.raises(grpc.RpcError) as err:
            stub.GetCollection(pb.GetCollectionRequest(collection_id="c"))
        assert err.value.code() == Code.DATA_LOSS
    db = sqlite3.connect(f"file:{data / 'vault.db'}?mode=ro", uri=True)
    try:
        states = [r[0] for r in db.execute(
            "SELECT state FROM templates WHERE collection_id='c' ORDER BY rowid")]
    finally:
        db.close()
    assert states == [DELETED, LIVE]  # Alice's row; the forged one untouched
