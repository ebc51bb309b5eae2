"""An older copy of a collection row, put back by someone who can write the database.

The row holds what the decider applies: the threshold, the purpose requirement, the
minimum key version. Each copy carries a valid MAC, so the MAC alone let an attacker
who saved the row undo an admin's UpdateCollection (or SetMinKeyVersion) by writing it
back. Every write now gives the row the next revision, under its MAC; a running vault
refuses a row older than one it served, and the row is a leaf of its key version's
live-set commitment, so a restart refuses it too. Tried on a real server; a legacy row
(schema 5, no revision) keeps working and is refused once an update superseded it.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path

import grpc
import pytest

from vault.domain.errors import DataLoss
from vault.keys.hsm import HsmConfig
from vault.service import Tuning, Vault
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

Code = grpc.StatusCode
ENV = {"VAULT_RATE_LIMIT": "0", "VAULT_IDENTIFY_BUDGET": "0", "VAULT_PROBE_CLUSTER": "0"}


def _saved_row(data: Path) -> dict[str, object]:
    db = sqlite3.connect(f"file:{data / 'vault.db'}?mode=ro", uri=True)
    try:
        cursor = db.execute("SELECT * FROM collections WHERE collection_id='c'")
        return dict(zip([d[0] for d in cursor.description], cursor.fetchone()))
    finally:
        db.close()


def _put_back(data: Path, row: dict[str, object]) -> None:
    db = sqlite3.connect(data / "vault.db", timeout=30)
    try:
        with db:
            db.execute(f"UPDATE collections SET {', '.join(f'{k}=?' for k in row)} "
                       "WHERE collection_id='c'", tuple(row.values()))
    finally:
        db.close()


def _alice_enrolled(channel: grpc.Channel, face: list[float], threshold: float):  # type: ignore[no-untyped-def]
    """A stub, collection "c" created with ``threshold`` and "alice" enrolled in it."""
    stub = vault_pb2_grpc.TemplateVaultStub(channel)
    stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128,
                                                     threshold=threshold))
    stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id="alice", embedding=face))
    return stub


def _code(call) -> Code:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


def test_an_older_copy_of_the_collection_row_is_refused_running_and_after_a_restart(
        tmp_path: Path, lfw) -> None:
    face = lfw["emb"][0].tolist()
    data = tmp_path / "data"
    with ServerProcess(data, env=ENV) as server, server.channel() as channel:
        stub = _alice_enrolled(channel, face, threshold=0.5)
        search = lambda: stub.Match(pb.MatchRequest(collection_id="c", embedding=face))  # noqa: E731
        verify = lambda: stub.Match(pb.MatchRequest(  # noqa: E731
            collection_id="c", subject_id="alice", embedding=face))
        assert _code(search) == Code.OK
        saved = _saved_row(data)  # the attacker keeps a copy
        stub.UpdateCollection(pb.UpdateCollectionRequest(collection_id="c", threshold=0.9,
                                                         require_purpose=True))
        assert _code(search) == Code.FAILED_PRECONDITION  # a purpose is now required
        _put_back(data, saved)
        assert _code(search) == Code.DATA_LOSS  # not served under the old policy
        assert _code(verify) == Code.DATA_LOSS
        with pytest.raises(grpc.RpcError) as err:  # the reason is given, without values
            stub.GetCollection(pb.GetCollectionRequest(collection_id="c"))
        assert "older copy" in (err.value.details() or "")
    with ServerProcess(data, env=ENV) as server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        assert _code(lambda: stub.Match(pb.MatchRequest(collection_id="c", embedding=face))) \
            == Code.DATA_LOSS


def test_matches_during_updates_are_never_taken_for_a_replay(tmp_path: Path, lfw) -> None:
    """A match that read the row just before an update committed holds an older
    revision than the gallery has served: it is served, not refused."""
    face = lfw["emb"][0].tolist()
    data = tmp_path / "data"
    with ServerProcess(data, env=ENV) as server, server.channel() as channel:
        stub = _alice_enrolled(channel, face, threshold=0.6)
        stop, codes = threading.Event(), []

        def hammer() -> None:
            while not stop.is_set():
                codes.append(_code(lambda: stub.Match(pb.MatchRequest(
                    collection_id="c", embedding=face, purpose="case-1"))))

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        for k in range(30):
            stub.UpdateCollection(pb.UpdateCollectionRequest(collection_id="c",
                                                             threshold=0.6 + 0.01 * (k % 2)))
        stop.set()
        for t in threads:
            t.join()
        assert codes and set(codes) == {Code.OK}, {c for c in codes if c != Code.OK}
    with ServerProcess(data, env=ENV) as server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        reply = stub.Match(pb.MatchRequest(collection_id="c", embedding=face))
        assert [c.subject_id for c in reply.candidates] == ["alice"]


def test_a_legacy_row_without_a_revision_serves_until_an_update_supersedes_it(
        tmp_path: Path, hsm_config: HsmConfig, lfw) -> None:
    tuning = Tuning(maintenance_interval=0, workers=0)
    data = tmp_path / "data"
    face = lfw["emb"][0].tolist()
    vault = Vault.open(data, hsm_config, tuning=tuning)
    vault.create_collection("c", 128, 0.9)
    vault.enroll("c", "alice", face)
    # What a schema-5 vault wrote: a row whose MAC covers no revision, outside the live
    # set (update_collection takes the revision-1 leaf out and adds none for revision 0).
    stored = vault.store.collection("c")
    assert stored is not None and stored.revision == 1
    vault.store.update_collection(vault.sign(dataclasses.replace(stored, revision=0, mac=b"")))
    vault.close()
    with sqlite3.connect(data / "vault.db") as db:
        db.execute("ALTER TABLE collections DROP COLUMN revision")
        db.execute("PRAGMA user_version=5")
    legacy = _saved_row(data)

    vault = Vault.open(data, hsm_config, tuning=tuning)  # migrated: the column, at 0
    try:
        assert vault.store.collection("c").revision == 0  # type: ignore[union-attr]
        assert vault.verify("c", "alice", face).matched
        vault.update_collection("c", threshold=0.95)
        assert vault.store.collection("c").revision == 1  # type: ignore[union-attr]
        assert vault.verify("c", "alice", face).matched
    finally:
        vault.close()
    _put_back(data, legacy | {"revision": 0})
    vault = Vault.open(data, hsm_config, tuning=tuning)
    try:
        with pytest.raises(DataLoss):
            vault.verify("c", "alice", face)
    finally:
        vault.close()


def test_the_revision_is_under_the_mac(tmp_path: Path, hsm_config: HsmConfig, lfw) -> None:
    """A saved row given a higher revision (to pass as the newest) fails its MAC."""
    vault = Vault.open(tmp_path / "data", hsm_config, tuning=Tuning(maintenance_interval=0, workers=0))
    try:
        vault.create_collection("c", 128, 0.9)
        row = vault.store.collection("c")
        assert row is not None
        assert vault.verified(row)
        assert not vault.verified(dataclasses.replace(row, revision=row.revision + 5))
    finally:
        vault.close()
