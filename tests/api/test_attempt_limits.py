"""Attempt limits that hold, tried through a real mTLS server by callers holding only a
matcher certificate: parallel impostor tries, one matcher against another, a cleared lock
row, and the admin's UnlockSubject."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from vault.testing import CertificateAuthority, ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

Code = grpc.StatusCode
LIMIT = 5  # the server's default


@pytest.fixture(scope="module")
def world(tmp_path_factory, lfw) -> Iterator[tuple[ServerProcess, CertificateAuthority, dict]]:
    root = tmp_path_factory.mktemp("attempts")
    pki = CertificateAuthority(root / "pki")
    for name, roles in (("enroll-svc", ("enroller",)), ("gate-1", ("matcher",)),
                        ("gate-2", ("matcher",)), ("gate-3", ("matcher",)),
                        ("gate-4", ("matcher",)), ("gate-5", ("matcher",))):
        pki.issue(name, roles)
    emb, ids = lfw["emb"], lfw["ids"]
    people = [int(np.flatnonzero(ids == p)[0]) for p in np.unique(ids)[:40]]
    faces = {f"p{k}": emb[i] for k, i in enumerate(people)}
    server = ServerProcess(root / "data", pki=pki, env={"VAULT_RATE_LIMIT": "0"})
    with server:
        with server.channel() as admin:
            vault_pb2_grpc.TemplateVaultStub(admin).CreateCollection(
                pb.CreateCollectionRequest(collection_id="doors", dimension=128, threshold=0.92))
        enroll = _stub(server, pki, "enroll-svc")
        for subject in ("p0", "p1", "p2"):
            enroll.Enroll(pb.EnrollRequest(collection_id="doors", subject_id=subject,
                                           embedding=faces[subject]), timeout=30)
        yield server, pki, faces


def _stub(server: ServerProcess, pki: CertificateAuthority, name: str):  # type: ignore[no-untyped-def]
    return vault_pb2_grpc.TemplateVaultStub(pki.channel(server.target, name))


def _match(stub, subject: str, face: np.ndarray) -> tuple[Code, bool]:  # type: ignore[no-untyped-def]
    try:
        answer = stub.Match(pb.MatchRequest(collection_id="doors", subject_id=subject,
                                            embedding=face), timeout=60)
    except grpc.RpcError as err:
        return err.code(), False
    return Code.OK, answer.matched


def _lock_out(gate, subject: str, faces: dict, first: int) -> None:  # type: ignore[no-untyped-def]
    """LIMIT impostor tries (faces p<first>...) lock the (subject, credential) pair."""
    for k in range(LIMIT):
        assert _match(gate, subject, faces[f"p{first + k}"]) == (Code.OK, False)
    assert _match(gate, subject, faces[subject])[0] == Code.RESOURCE_EXHAUSTED


def _write_db(server: ServerProcess, sql: str) -> int:
    """An attacker's write to the live server's database; returns the rows it touched."""
    db = sqlite3.connect(server.data_dir / "vault.db", timeout=30)
    with db:
        count = db.execute(sql).rowcount
    db.close()
    return count


def test_parallel_impostor_tries_are_evaluated_at_most_limit_times(world) -> None:
    server, pki, faces = world
    gate = _stub(server, pki, "gate-1")
    impostors = [faces[f"p{k}"] for k in range(8, 40)]  # 32 other people
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda f: _match(gate, "p0", f), impostors))
    evaluated = [a for a in answers if a[0] != Code.RESOURCE_EXHAUSTED]
    assert all(a == (Code.OK, False) for a in evaluated)
    # Every try reserved its attempt before scoring: no more than the limit got an answer.
    assert 1 <= len(evaluated) <= LIMIT, answers
    # Locked for this credential, even for the genuine face...
    assert _match(gate, "p0", faces["p0"])[0] == Code.RESOURCE_EXHAUSTED
    # ...but one matcher cannot lock a person out for every other gate.
    assert _match(_stub(server, pki, "gate-2"), "p0", faces["p0"]) == (Code.OK, True)


def test_four_failures_and_a_success_repeated_lock(world) -> None:
    server, pki, faces = world
    gate = _stub(server, pki, "gate-2")
    answers = []
    for round_ in range(2):
        for k in range(4):
            answers.append(_match(gate, "p1", faces[f"p{10 + 4 * round_ + k}"]))
        answers.append(_match(gate, "p1", faces["p1"]))
    # Five failures in the window lock, the genuine successes in between do not reset them.
    assert answers[:5] == [(Code.OK, False)] * 4 + [(Code.OK, True)]
    assert answers[5] == (Code.OK, False)
    assert all(a[0] == Code.RESOURCE_EXHAUSTED for a in answers[6:])


def test_a_cleared_lock_row_keeps_the_subject_locked_until_an_admin_unlocks(world, tmp_path) -> None:
    server, pki, faces = world
    gate = _stub(server, pki, "gate-3")
    _lock_out(gate, "p2", faces, first=20)
    # An attacker with write access to the database clears every lock, under the live server.
    assert _write_db(server, "UPDATE verify_attempts SET failures=0, locked_until=0") >= 2
    code, _ = _match(gate, "p2", faces["p2"])
    assert code == Code.DATA_LOSS
    # Only an admin may unlock; the unlock is on the audit record.
    try:
        gate.UnlockSubject(pb.UnlockSubjectRequest(collection_id="doors", subject_id="p2"), timeout=20)
    except grpc.RpcError as err:
        assert err.code() == Code.PERMISSION_DENIED
    else:
        raise AssertionError("a matcher unlocked a subject")
    with server.channel() as channel:
        admin = vault_pb2_grpc.TemplateVaultStub(channel)
        for subject in ("p0", "p1", "p2"):
            admin.UnlockSubject(pb.UnlockSubjectRequest(collection_id="doors", subject_id=subject),
                                timeout=20)
    assert _match(gate, "p2", faces["p2"]) == (Code.OK, True)
    assert _match(_stub(server, pki, "gate-1"), "p0", faces["p0"]) == (Code.OK, True)
    shutil.copy(server.data_dir / "audit.db", tmp_path / "audit.db")
    for suffix in ("-wal", "-shm"):
        if (server.data_dir / f"audit.db{suffix}").exists():
            shutil.copy(server.data_dir / f"audit.db{suffix}", tmp_path / f"audit.db{suffix}")
    audit = sqlite3.connect(tmp_path / "audit.db")
    rows = audit.execute("SELECT actor, outcome FROM entries WHERE method='UnlockSubject' "
                         "AND kind='response'").fetchall()
    integrity = audit.execute("SELECT COUNT(*) FROM entries WHERE kind='integrity'").fetchone()[0]
    audit.close()
    # The matcher's refused try is counted in a batched `refused` entry (tests/api/test_release.py).
    assert rows == [("admin", "OK")] * 3
    assert integrity >= 1


def test_a_deleted_lock_row_is_detected_until_an_admin_unlocks(world) -> None:
    """A writer deletes the lock rows under the live server: the collection's attempt set no
    longer sums to its commitment, so 1:1 answers DATA_LOSS (not a fresh count) until an
    admin unlocks (found in review: deleting a row lifted the lock silently)."""
    server, pki, faces = world
    gate = _stub(server, pki, "gate-4")
    _lock_out(gate, "p1", faces, first=25)
    assert _write_db(server, "DELETE FROM verify_attempts") >= 1
    assert _match(gate, "p1", faces["p1"])[0] == Code.DATA_LOSS
    assert _match(_stub(server, pki, "gate-5"), "p0", faces["p0"])[0] == Code.DATA_LOSS
    with server.channel() as channel:
        vault_pb2_grpc.TemplateVaultStub(channel).UnlockSubject(
            pb.UnlockSubjectRequest(collection_id="doors", subject_id="p1"), timeout=20)
    assert _match(gate, "p1", faces["p1"]) == (Code.OK, True)
