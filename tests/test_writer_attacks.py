"""An attacker with the data directory of a running vault: copies it, and writes it.

One real server (small ``--erase-after``) enrolls subjects into journal pages and imports
others into blocks, in several collections; then two subjects are deleted everywhere.

- **Copy**: within the erasure window, a plain file copy of the live data directory (and
  another after SIGKILL) holds no byte of a deleted subject's sealed id or subject HMAC,
  nor any window of the page and block ciphertexts that held its template: in no file,
  the database's WAL, shared memory and free pages included. The needles are read from
  the files before the deletion, as an attacker who copied them then would.
- **Write**: with the server stopped, each collection suffers one attack on its set of
  rows (a subjects row deleted, a subject's template rows deleted, a deleted subject's
  rows restored from the older copy, a dropped journal page replayed with its valid old
  MAC, block files swapped between collections); the restarted server answers DATA_LOSS
  for it (1:1 and 1:N: never a silent non-match, never the deleted person), logs the
  integrity failure and reports it on health, while the untouched collection serves.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vault.api.lifecycle import INTEGRITY_SERVICE
from vault.ops.maintenance import schedule
from vault.service import Tuning
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

ERASE_AFTER, INTERVAL = 4.0, 0.5
COLLECTIONS = ["c0", "c1", "c2", "c3", "c4", "c5"]  # c0 is never tampered with
DIM = 32
PADDING = 5  # imported with dave, so that his block holds others too


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _subject_rows(data: Path, cid: str) -> dict[bytes, bytes]:
    db = _ro(data / "vault.db")
    try:
        return dict(db.execute("SELECT subject_hmac, sealed_subject_id FROM subjects "
                               "WHERE collection_id=?", (cid,)))
    finally:
        db.close()


def _windows(raw: bytes, start: int = 0, count: int = 48, size: int = 32) -> list[bytes]:
    """Distinctive windows of ciphertext bytes (not zero padding)."""
    step = max(1, (len(raw) - start - size) // count)
    found = [raw[i:i + size] for i in range(start, len(raw) - size, step)]
    return [w for w in found if len(set(w)) > 8][:count]


def _import(stub, cid: str, items: list[tuple[str, np.ndarray]]) -> None:
    batch = pb.ImportTemplatesRequest(collection_id=cid, items=[
        pb.ImportItem(subject_id=s, embedding=e.tolist()) for s, e in items])
    results = [r for resp in stub.ImportTemplates(iter([batch])) for r in resp.results]
    assert len(results) == len(items) and all(r.code == 0 for r in results)


def _leftovers(root: Path, needles: dict[str, list[bytes]], skip_hmac_in: tuple[str, ...]) -> list[str]:
    """Which needles some file under ``root`` still holds."""
    found = []
    for path in (p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for kind, values in needles.items():
            if kind == "subject_hmac" and path.name.startswith(skip_hmac_in):
                continue
            hits = sum(v in data for v in values)
            if hits:
                found.append(f"{hits} {kind} in {path.relative_to(root)}")
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("writer")
    data = root / "data"
    # Random faces of a small dimension: block jobs cost D encryptions, and any distinct
    # vectors tell one subject from another as well as real faces do here.
    faces = np.random.default_rng(3).standard_normal((4 + PADDING, DIM))
    people = dict(zip(["alice", "carol", "bob", "dave"], faces))
    padding = faces[4:]
    server = ServerProcess(data, args=["--erase-after", str(ERASE_AFTER), "--maintenance-interval",
                                       str(INTERVAL), "--max-failed-verifications", "0"])
    server.start()
    hmacs: dict[str, dict[str, bytes]] = {}
    needles: dict[str, list[bytes]] = {"sealed_id": [], "subject_hmac": [], "page_ciphertext": [],
                                       "block_ciphertext": []}
    try:
        with server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            for cid in COLLECTIONS:
                stub.CreateCollection(pb.CreateCollectionRequest(collection_id=cid, dimension=DIM,
                                                                 threshold=0.9))
                hmacs[cid] = {}

                def enroll(name: str, cid: str = cid) -> None:
                    stub.Enroll(pb.EnrollRequest(collection_id=cid, subject_id=name,
                                                 embedding=people[name].tolist()))

                def import_dave(cid: str = cid) -> None:
                    _import(stub, cid, [("dave", people["dave"])] +
                            [(f"pad-{k}", x) for k, x in enumerate(padding)])

                steps = [(name, lambda name=name: enroll(name)) for name in ("alice", "carol", "bob")]
                steps.append(("dave", import_dave))
                for name, step in steps:  # whose subjects row is whose: the one that appeared
                    before = _subject_rows(data, cid)
                    step()
                    after = _subject_rows(data, cid)
                    new = [h for h in after if h not in before]
                    assert len(new) == (1 if name != "dave" else 1 + PADDING)
                    if name == "dave":  # the import added dave and the padding: his row is
                        # that of the template in slot 0 of the block the import wrote
                        db = _ro(data / "vault.db")
                        new = [db.execute("SELECT subject_hmac FROM templates WHERE collection_id=? "
                                          "AND tier=1 AND slot=0", (cid,)).fetchone()[0]]
                        db.close()
                    hmacs[cid][name] = new[0]
                    if name in ("bob", "dave"):
                        needles["sealed_id"].append(after[new[0]])
                        needles["subject_hmac"].append(new[0])
            # What an attacker who copied the files now would hold of bob's page and dave's
            # block: every page ciphertext and block file of these collections.
            before_copy = root / "before"
            before_copy.mkdir()
            for name in ("vault.db", "vault.db-wal"):
                if (data / name).exists():
                    shutil.copy(data / name, before_copy / name)
            db = sqlite3.connect(before_copy / "vault.db")
            for (ct,) in db.execute("SELECT ciphertext FROM pages"):
                needles["page_ciphertext"] += _windows(ct)
            db.close()
            old_blocks = sorted((data / "blocks").rglob("*.blk"))
            assert len(old_blocks) == len(COLLECTIONS)
            for path in old_blocks:
                needles["block_ciphertext"] += _windows(path.read_bytes(), start=4096)
            for cid in COLLECTIONS:
                for name in ("bob", "dave"):
                    stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id=cid, subject_id=name))
        # Wait for the erasure: the WAL truncated, no tombstone left, no block file but the
        # one current generation per collection (the replaced ones zero-filled and gone).
        deadline, pending = time.monotonic() + 120, -1
        while time.monotonic() < deadline:
            wal = data / "vault.db-wal"
            files = list((data / "blocks").rglob("*.blk"))
            if ((not wal.exists() or wal.stat().st_size == 0) and len(files) == len(COLLECTIONS)
                    and not any(p.exists() for p in old_blocks)):
                db = _ro(data / "vault.db")
                pending = db.execute("SELECT count(*) FROM templates WHERE state=2").fetchone()[0]
                db.close()
                if pending == 0 and (not wal.exists() or wal.stat().st_size == 0):
                    break
            time.sleep(0.2)
        else:
            wal = data / "vault.db-wal"
            pytest.fail(f"the erasure did not finish: tombstones {pending}, WAL bytes "
                        f"{wal.stat().st_size if wal.exists() else 0}, old block files "
                        f"{sum(p.exists() for p in old_blocks)}")
        live = root / "copy-live"
        shutil.copytree(data, live)  # plain file copies while the server runs
        server.kill()
        killed = root / "copy-killed"
        shutil.copytree(data, killed)
    finally:
        server.kill()
    return {"root": root, "data": data, "server": server, "needles": needles, "hmacs": hmacs,
            "people": people, "before": before_copy, "live": live, "killed": killed}


def test_the_erasure_schedule_fits_within_erase_after() -> None:
    for erase_after, interval in ((ERASE_AFTER, INTERVAL), (60.0, 5.0), (600.0, 5.0)):
        start, grace = schedule(Tuning(erase_after=erase_after, maintenance_interval=interval))
        # erasure starts, runs by the next pass, truncates the WAL in it; the replaced file
        # is removed after its grace, by the pass after that
        assert start + interval + grace + interval <= erase_after
        assert grace > 0


@pytest.mark.parametrize("copy", ["live", "killed"])
def test_a_copy_holds_nothing_of_a_deleted_subject(run: dict, copy: str) -> None:
    needles = run["needles"]
    assert len(needles["sealed_id"]) == 2 * len(COLLECTIONS)
    assert len(needles["page_ciphertext"]) >= 40 * len(COLLECTIONS)
    assert len(needles["block_ciphertext"]) >= 40 * len(COLLECTIONS)
    # The needles are real: the database copied before the deletion holds every one of
    # them (the block windows were read from the block files themselves).
    before = b"".join(p.read_bytes() for p in run["before"].iterdir())
    for kind in ("sealed_id", "subject_hmac", "page_ciphertext"):
        assert all(v in before for v in needles[kind]), kind
    # audit.db references subjects by design (vault.audit, erasable there): not looked at
    # for the HMAC here; ciphertexts and sealed ids must be in no file at all.
    assert _leftovers(run[copy], needles, skip_hmac_in=("audit.db",)) == []


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _tamper(run: dict) -> None:
    """One attack per collection c1..c5, on the stopped server's files."""
    data, hmacs = run["data"], run["hmacs"]
    old = sqlite3.connect(run["before"] / "vault.db")
    db = sqlite3.connect(data / "vault.db")
    with db:
        # c1: alice's subjects row deleted (1:N would never name her again).
        db.execute("DELETE FROM subjects WHERE collection_id='c1' AND subject_hmac=?",
                   (hmacs["c1"]["alice"],))
        # c2: alice's template rows deleted.
        db.execute("DELETE FROM templates WHERE collection_id='c2' AND subject_hmac=?",
                   (hmacs["c2"]["alice"],))
        # c3: the deleted bob's and dave's old live rows restored from the older copy.
        for name in ("bob", "dave"):
            h = hmacs["c3"][name]
            for row in old.execute("SELECT * FROM templates WHERE collection_id='c3' AND "
                                   "subject_hmac=?", (h,)):
                db.execute(f"INSERT OR REPLACE INTO templates VALUES ({','.join('?' * len(row))})", row)
            db.execute("INSERT OR REPLACE INTO subjects VALUES (?,?,?)",
                       old.execute("SELECT * FROM subjects WHERE collection_id='c3' AND "
                                   "subject_hmac=?", (h,)).fetchone())
        # c4: the journal page that held bob, dropped by the checkpoint, replayed with its
        # valid old MAC.
        for row in old.execute("SELECT * FROM pages WHERE collection_id='c4'"):
            db.execute(f"INSERT INTO pages VALUES ({','.join('?' * len(row))})", row)
    db.close()
    old.close()
    # c5: its block file and c4's swapped.
    (a,) = (data / "blocks" / "c4").rglob("*.blk")
    (b,) = (data / "blocks" / "c5").rglob("*.blk")
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(raw_b)
    b.write_bytes(raw_a)


def test_tampered_sets_are_detected(run: dict) -> None:
    _tamper(run)
    people = run["people"]
    server = ServerProcess(run["data"], log_path=run["root"] / "tampered.log",
                           args=["--erase-after", str(ERASE_AFTER), "--maintenance-interval",
                                 str(INTERVAL), "--max-failed-verifications", "0"])
    with server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)

        def verify(cid: str, name: str):  # type: ignore[no-untyped-def]
            return stub.Match(pb.MatchRequest(collection_id=cid, subject_id=name,
                                              embedding=people[name].tolist()))

        def identify(cid: str, name: str):  # type: ignore[no-untyped-def]
            return stub.Match(pb.MatchRequest(collection_id=cid, embedding=people[name].tolist(),
                                              top_k=3))

        # The untouched collection serves as before; the deleted stay deleted.
        assert verify("c0", "alice").matched
        assert [c.subject_id for c in identify("c0", "alice").candidates] == ["alice"]
        assert _code(lambda: verify("c0", "bob")) == grpc.StatusCode.NOT_FOUND
        assert "bob" not in [c.subject_id for c in identify("c0", "bob").candidates]
        for cid in ("c1", "c2", "c3", "c4", "c5"):
            for name in ("alice", "carol", "bob", "dave"):
                assert _code(lambda c=cid, n=name: identify(c, n)) == grpc.StatusCode.DATA_LOSS, \
                    (cid, name)
            for name in ("alice", "carol"):
                assert _code(lambda c=cid, n=name: verify(c, n)) == grpc.StatusCode.DATA_LOSS, \
                    (cid, name)
        assert _code(lambda: verify("c3", "bob")) == grpc.StatusCode.DATA_LOSS
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING  # the other collections serve on
        assert health.Check(health_pb2.HealthCheckRequest(service=INTEGRITY_SERVICE)).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        # While it runs: c0's alice loses her subjects row; 1:N must not skip her silently.
        db = sqlite3.connect(run["data"] / "vault.db")
        with db:
            db.execute("DELETE FROM subjects WHERE collection_id='c0' AND subject_hmac=?",
                       (run["hmacs"]["c0"]["alice"],))
        db.close()
        assert _code(lambda: identify("c0", "alice")) == grpc.StatusCode.DATA_LOSS
    log = server.log_path.read_text()
    for kind in ("subject_missing", "live_set", "records"):
        assert f"kind={kind}" in log or f'"kind": "{kind}"' in log, kind


def _wait_erased(data: Path, timeout: float = 120) -> None:
    """Until no tombstone is left and the WAL is truncated (the erasure pass is done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wal = data / "vault.db-wal"
        db = _ro(data / "vault.db")
        pending = db.execute("SELECT count(*) FROM templates WHERE state=2").fetchone()[0]
        db.close()
        if pending == 0 and (not wal.exists() or wal.stat().st_size == 0):
            return
        time.sleep(0.2)
    pytest.fail("the erasure did not finish after the restart")


def test_a_kill_before_the_erasure_does_not_keep_a_deleted_subject(tmp_path: Path) -> None:
    """SIGKILL right after DeleteSubject, before any erasure pass: the restarted server
    erases the tombstones it finds at once, and a copy then holds nothing of the subject
    (the copy taken at the kill still holds it: the kill came first)."""
    data = tmp_path / "data"
    args = ["--erase-after", str(ERASE_AFTER), "--maintenance-interval", str(INTERVAL)]
    faces = np.random.default_rng(8).standard_normal((3, DIM))
    server = ServerProcess(data, args=args).start()
    try:
        with server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="k", dimension=DIM,
                                                             threshold=0.9))
            for name, face in zip(("alice", "bob", "carol"), faces):
                before = _subject_rows(data, "k")
                stub.Enroll(pb.EnrollRequest(collection_id="k", subject_id=name,
                                             embedding=face.tolist()))
                if name == "bob":
                    (bob,) = [h for h in _subject_rows(data, "k") if h not in before]
            needles = {"sealed_id": [_subject_rows(data, "k")[bob]], "subject_hmac": [bob]}
            db = _ro(data / "vault.db")
            needles["page_ciphertext"] = [w for (ct,) in db.execute("SELECT ciphertext FROM pages")
                                          for w in _windows(ct)]
            db.close()
            stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id="k", subject_id="bob"))
        server.kill()  # well inside the erasure window: no pass has erased anything yet
        at_kill = tmp_path / "at-kill"
        shutil.copytree(data, at_kill)
        assert _leftovers(at_kill, {"page_ciphertext": needles["page_ciphertext"]}, ())
        server.start()
        _wait_erased(data)
        with server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            probe = pb.MatchRequest(collection_id="k", embedding=faces[1].tolist())
            assert not stub.Match(probe).matched
            assert stub.Match(pb.MatchRequest(collection_id="k",
                                              embedding=faces[0].tolist())).matched
        after = tmp_path / "after"
        shutil.copytree(data, after)
    finally:
        server.kill()
    assert _leftovers(after, needles, skip_hmac_in=("audit.db",)) == []
