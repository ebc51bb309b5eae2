"""The audit log: every call leaves entries, nothing personal in them, tampering is named,
and when the log cannot be written the request is refused before it runs."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from vault import audit
from vault.custody import default_hsm_dir
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc


def _verify(data_dir: Path, hsm_dir: Path) -> subprocess.CompletedProcess:
    """``vault audit verify`` of ``data_dir`` with the vault's own token (``hsm_dir``)."""
    env = {"PATH": "/usr/bin:/bin"}  # the CLI provisions nothing: it reads the existing token
    return subprocess.run([sys.executable, "-m", "vault", "audit", "verify", "--data-dir",
                           str(data_dir), "--hsm-dir", str(hsm_dir)],
                          capture_output=True, text=True, env=env, check=False)


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, lfw) -> Iterator[tuple[Path, np.ndarray]]:
    """A server that served a full cycle and was stopped (its log closed and signed)."""
    data = tmp_path_factory.mktemp("audit") / "data"
    emb = lfw["emb"].astype(np.float64)
    with ServerProcess(data) as server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128, threshold=0.9))
        for i in range(40):
            stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"alice-{i}@example.org",
                                         embedding=emb[i].tolist()), timeout=60)
        for i in range(40):
            stub.Match(pb.MatchRequest(collection_id="c", subject_id=f"alice-{i}@example.org",
                                       embedding=emb[i].tolist()))
            stub.Match(pb.MatchRequest(collection_id="c", embedding=emb[i].tolist()))
        with pytest.raises(grpc.RpcError):
            stub.Match(pb.MatchRequest(collection_id="c", subject_id="nobody", embedding=emb[0].tolist()))
        stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id="c", subject_id="alice-0@example.org"))
    yield data, emb


def _copy(src: Path, dst: Path) -> Path:
    """A copy of the data directory to tamper with (the token stays where it is)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def test_every_call_is_audited_without_personal_data(audited) -> None:
    data, emb = audited
    db = sqlite3.connect(data / "audit.db")
    rows = db.execute("SELECT kind, method, outcome, subject_hmacs FROM entries ORDER BY seq").fetchall()
    db.close()
    requests = [r for r in rows if r[0] == "request"]
    responses = [r for r in rows if r[0] == "response"]
    assert len(requests) == len(responses) == 1 + 40 + 80 + 1 + 1
    outcomes = [r[2] for r in responses if r[1] == "Match"]
    assert outcomes.count("OK matched") == 80 and outcomes.count("NOT_FOUND") == 1
    # 1:N responses name the returned subject by its HMAC.
    assert all(r[3] for r in responses if r[1] == "Match" and r[2] == "OK matched")
    raw = b"".join(p.read_bytes() for p in data.glob("audit.db*"))
    for i in range(40):
        assert f"alice-{i}@example.org".encode() not in raw
    for vec in emb[:40]:
        assert vec.astype(np.float32).tobytes()[:16] not in raw
    assert b"score" not in raw.lower()
    done = _verify(data, default_hsm_dir(data))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout and "unsigned tail: 0" in done.stdout


def _tampered(audited, tmp_path: Path, sql: str, args: tuple = ()) -> subprocess.CompletedProcess:
    data = _copy(audited[0], tmp_path / "copy")
    db = sqlite3.connect(data / "audit.db")
    db.execute(sql, args)
    db.commit()
    db.close()
    return _verify(data, default_hsm_dir(audited[0]))


def test_an_edited_entry_is_named(audited, tmp_path: Path) -> None:
    done = _tampered(audited, tmp_path, "UPDATE entries SET outcome='OK matched' WHERE seq=5")
    assert done.returncode == 1 and "BAD: entry 5: hash chain broken" in done.stdout


def test_a_deleted_entry_is_named(audited, tmp_path: Path) -> None:
    done = _tampered(audited, tmp_path, "DELETE FROM entries WHERE seq=17")
    assert done.returncode == 1 and "BAD: entry 17: missing" in done.stdout


def test_a_rewritten_chain_is_caught_by_the_signed_checkpoint(audited, tmp_path: Path) -> None:
    data = _copy(audited[0], tmp_path / "copy")
    db = sqlite3.connect(data / "audit.db")
    # The attacker edits entry 3 and recomputes every hash after it: the chain is whole again.
    db.execute("UPDATE entries SET outcome='NOT_FOUND' WHERE seq=3")
    rows = db.execute(f"SELECT {audit._COLUMNS} FROM entries ORDER BY seq").fetchall()
    head = audit.GENESIS
    for row in rows:
        entry = audit.Entry(*row[:9])
        head = entry.digest(head)
        db.execute("UPDATE entries SET hash=? WHERE seq=?", (head, entry.seq))
    db.commit()
    db.close()
    done = _verify(data, default_hsm_dir(audited[0]))
    assert done.returncode == 1
    assert "differs from its signed checkpoint" in done.stdout


def test_a_forged_checkpoint_and_a_truncated_log_are_caught(audited, tmp_path: Path) -> None:
    done = _tampered(audited, tmp_path / "a", "UPDATE checkpoints SET signature=? WHERE seq=64",
                     (hashlib.sha512(b"forged").digest(),))
    assert done.returncode == 1 and "BAD: checkpoint 64: bad signature" in done.stdout
    done = _tampered(audited, tmp_path / "b", "DELETE FROM entries WHERE seq > 100")
    assert done.returncode == 1 and "signs entries that are gone" in done.stdout


def test_requests_fail_closed_when_the_audit_log_cannot_be_written(vault, lfw) -> None:
    from vault.api.server import build_server

    assert vault.audit is not None
    emb = lfw["emb"].astype(np.float64)
    server, port, _ = build_server(vault, "127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128, threshold=0.9))
            stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id="a", embedding=emb[0].tolist()))
            vault.audit._db.close()  # the audit sink breaks (its file handle is gone)
            for call, request in [
                (stub.Enroll, pb.EnrollRequest(collection_id="c", subject_id="b", embedding=emb[1].tolist())),
                (stub.Match, pb.MatchRequest(collection_id="c", subject_id="a", embedding=emb[0].tolist())),
                (stub.DeleteSubject, pb.DeleteSubjectRequest(collection_id="c", subject_id="a")),
            ]:
                with pytest.raises(grpc.RpcError) as err:
                    call(request, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "audit log unavailable" in err.value.details()
        # Nothing ran: one template, subject a still there.
        assert vault.get_collection("c").template_count == 1
        assert vault.store.subject_templates("c", vault.integrity.subject_index("c", "a"))
    finally:
        server.stop(0)
        vault.audit = None  # its connection is closed already


def test_audit_subject_references_link_no_two_calls_and_no_blind_index(audited) -> None:
    """An attacker with a copy of both databases: the subject references of two calls
    never match (each is keyed by its entry), and the blind index of vault.db is absent."""
    data, _ = audited
    db = sqlite3.connect(data / "audit.db")
    refs: dict[str, set[str]] = {}
    for ref, hmacs in db.execute("SELECT ref, subject_hmacs FROM entries WHERE subject_hmacs != ''"):
        for h in hmacs.split(","):
            refs.setdefault(h, set()).add(ref)
    db.close()
    assert len(refs) >= 80  # 40 1:1 and 40 1:N calls name a subject
    assert all(len(calls) == 1 for calls in refs.values())  # one call each, never two
    index = {bytes(h).hex() for (h,) in sqlite3.connect(data / "vault.db").execute(
        "SELECT DISTINCT subject_hmac FROM templates WHERE length(subject_hmac) > 0")}
    raw = b"".join(p.read_bytes() for p in data.glob("audit.db*"))
    assert index and not any(h.encode() in raw or bytes.fromhex(h) in raw for h in index)


def test_an_investigator_finds_a_subjects_entries_until_it_is_deleted(vault, lfw) -> None:
    from vault.api.server import build_server

    emb = lfw["emb"].astype(np.float64)
    server, port, _ = build_server(vault, "127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128,
                                                             threshold=0.9))
            for i, name in enumerate(("a", "b")):
                stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=name,
                                             embedding=emb[i].tolist()))
            for _ in range(2):
                stub.Match(pb.MatchRequest(collection_id="c", subject_id="a",
                                           embedding=emb[0].tolist()))
            assert stub.Match(pb.MatchRequest(collection_id="c", embedding=emb[0].tolist())).matched

            def entries_of(subject: str) -> int:
                index = vault.integrity.subject_index("c", subject)
                db = sqlite3.connect(vault.audit.path)
                rows = db.execute("SELECT ref, subject_hmacs FROM entries").fetchall()
                db.close()
                return sum(vault.audit_subject_ref("c", index, ref).hex() in hmacs.split(",")
                           for ref, hmacs in rows if hmacs)

            # The enrolment's response, 2 x (request, response) of 1:1, the 1:N response.
            assert entries_of("a") == 6
            assert entries_of("b") == 1  # its enrolment only
            stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id="c", subject_id="a"))
            assert entries_of("a") == 0  # its sealed record, the key of its references, is gone
            stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id="a", embedding=emb[0].tolist()))
            assert entries_of("a") == 1  # a new record, a new key: only the new enrolment
    finally:
        server.stop(0)
