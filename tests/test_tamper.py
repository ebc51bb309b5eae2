"""Someone with write access to the data directory: swap, flip, replay, strip MACs.

Every record the vault stores is bound by an HSM-keyed MAC (collections, template rows,
journal pages, block rows over their file's digest), and each collection's live set by a
MACed commitment. Each attack below must be caught at load or at match: the record never
matches, the call gets DATA_LOSS (never a silent non-match), and the damage is logged.
Attacks on whole sets (rows deleted, restored, replayed) against a real server are in
tests/test_writer_attacks.py.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from vault.domain.errors import DataLoss
from vault.keys.hsm import HsmConfig
from vault.service import Tuning, Vault

TUNING = Tuning(maintenance_interval=0, workers=0)


def _open(path: Path, hsm_config: HsmConfig) -> Vault:
    return Vault.open(path, hsm_config, tuning=TUNING)


@pytest.fixture
def vault(tmp_path: Path, hsm_config: HsmConfig):  # type: ignore[no-untyped-def]
    v = _open(tmp_path / "data", hsm_config)
    yield v
    v.close()


def _reopen(vault: Vault, hsm_config: HsmConfig) -> Vault:
    path = vault.store.path.parent
    vault.close()
    return _open(path, hsm_config)


def _enroll_two(vault: Vault, lfw, into_blocks: bool) -> tuple[np.ndarray, np.ndarray]:
    vault.create_collection("c", 128, 0.9)
    a, b = lfw["emb"][0], lfw["emb"][5]
    vault.enroll("c", "alice", a.tolist())
    vault.enroll("c", "bob", b.tolist())
    if into_blocks:
        vault.maintain(force=True)  # checkpoint: the journal page moves into a block
    return a, b


def _swap_subjects(db: sqlite3.Connection, _data: Path) -> None:
    (ta, sa), (tb, sb) = db.execute("SELECT template_id, subject_hmac FROM templates ORDER BY rowid")
    db.execute("UPDATE templates SET subject_hmac=? WHERE template_id=?", (sb, ta))
    db.execute("UPDATE templates SET subject_hmac=? WHERE template_id=?", (sa, tb))


def _swap_slots(db: sqlite3.Connection, _data: Path) -> None:
    (ta, sa), (tb, sb) = db.execute("SELECT template_id, slot FROM templates ORDER BY rowid")
    db.execute("UPDATE templates SET slot=? WHERE template_id=?", (sb, ta))
    db.execute("UPDATE templates SET slot=? WHERE template_id=?", (sa, tb))


def _flip_page_byte(db: sqlite3.Connection, _data: Path) -> None:
    page_no, ct = db.execute("SELECT page_no, ciphertext FROM pages").fetchone()
    flipped = bytearray(ct)
    flipped[len(flipped) // 3] ^= 0x01
    db.execute("UPDATE pages SET ciphertext=? WHERE page_no=?", (bytes(flipped), page_no))


def _flip_block_file_byte(_db: sqlite3.Connection, data: Path) -> None:
    (path,) = sorted((data / "blocks").rglob("*.blk"))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _strip_macs(db: sqlite3.Connection, _data: Path) -> None:
    db.execute("UPDATE templates SET mac=x''")


ATTACKS = [(_swap_subjects, False), (_swap_slots, False), (_strip_macs, False),
           (_flip_page_byte, False), (_swap_subjects, True), (_swap_slots, True),
           (_strip_macs, True), (_flip_block_file_byte, True)]


@pytest.mark.parametrize("attack, in_blocks", ATTACKS,
                         ids=[f"{a.__name__.strip('_')}-{'block' if b else 'page'}" for a, b in ATTACKS])
def test_tampering_is_detected_and_never_matches(vault: Vault, hsm_config: HsmConfig, lfw,
                                                 attack: Callable[[sqlite3.Connection, Path], None],
                                                 in_blocks: bool, caplog) -> None:
    a, b = _enroll_two(vault, lfw, in_blocks)
    data = vault.store.path.parent
    db = sqlite3.connect(vault.store.path)
    with db:
        attack(db, data)
    db.close()
    if attack in (_flip_page_byte, _flip_block_file_byte):
        # Ciphertexts are matched from the vault's own memory: a change on disk does not
        # reach the running vault; the damaged copy is caught when it is next read.
        assert vault.verify("c", "alice", a.tolist()).matched
    else:
        # Rows are re-read and their MACs re-checked by every 1:1 match.
        with pytest.raises(DataLoss, match="integrity"):
            vault.verify("c", "alice", a.tolist())
    vault = _reopen(vault, hsm_config)
    try:
        with pytest.raises(DataLoss, match="integrity"):
            vault.verify("c", "alice", a.tolist())
        for probe in (a, b):
            # A tampered record is never named, nor silently skipped: 1:N cannot answer.
            with pytest.raises(DataLoss, match="integrity"):
                vault.identify("c", probe.tolist(), top_k=2, threshold=-1.0)
        assert vault.integrity_events
    finally:
        vault.close()


def test_a_block_file_changed_under_a_running_vault_stops_its_rewrite(vault: Vault, lfw) -> None:
    """Jobs that rewrite a block read every prime from its file: a file changed since the
    vault loaded it fails its digest, and the job refuses to build on it."""
    a, _ = _enroll_two(vault, lfw, into_blocks=True)
    _flip_block_file_byte(None, vault.store.path.parent)  # type: ignore[arg-type]
    vault.delete_subject("c", "bob")
    with pytest.raises(DataLoss, match="changed on disk"):
        from vault.ops.maintenance import compact
        gallery = vault.galleries()[0]
        compact(vault, gallery, next(iter(gallery.blocks)))
    assert vault.verify("c", "alice", a.tolist()).matched  # matching is unaffected


def test_replaying_an_old_journal_page_is_detected(vault: Vault, hsm_config: HsmConfig, lfw) -> None:
    vault.create_collection("c", 128, 0.9)
    a, c = lfw["emb"][0], lfw["emb"][9]
    vault.enroll("c", "alice", a.tolist())
    db = sqlite3.connect(vault.store.path)
    old_page = db.execute("SELECT * FROM pages").fetchall()
    vault.enroll("c", "carol", c.tolist())
    with db:  # put the page back as it was before carol enrolled (a valid old MAC)
        db.execute("DELETE FROM pages")
        db.executemany("INSERT INTO pages VALUES (?,?,?,?,?,?,?)", old_page)
    db.close()
    vault = _reopen(vault, hsm_config)
    try:  # the collection no longer matches its committed live set: nothing is answered
        for name, probe in (("alice", a), ("carol", c)):
            with pytest.raises(DataLoss, match="replayed"):
                vault.verify("c", name, probe.tolist())
        with pytest.raises(DataLoss):
            vault.identify("c", c.tolist())
    finally:
        vault.close()


def test_replaying_an_old_block_state_is_detected(vault: Vault, hsm_config: HsmConfig, lfw) -> None:
    vault.create_collection("c", 128, 0.9)
    a, c = lfw["emb"][0], lfw["emb"][9]
    vault.enroll("c", "alice", a.tolist())
    vault.maintain(force=True)
    data = vault.store.path.parent
    db = sqlite3.connect(vault.store.path)
    old_row = db.execute("SELECT * FROM blocks").fetchall()
    (old_file,) = (data / "blocks").rglob("*.blk")
    saved = data.parent / "old-block"
    shutil.copy(old_file, saved)
    vault.enroll("c", "carol", c.tolist())
    vault.maintain(force=True)  # carol moves into the same block: a new generation
    vault.close()
    with db:  # the attacker restores the old block row and its file
        db.execute("DELETE FROM blocks")
        db.executemany("INSERT INTO blocks VALUES (?,?,?,?,?,?,?,?,?,?)", old_row)
    db.close()
    shutil.copy(saved, old_file)
    vault = _open(data, hsm_config)
    try:
        for name, probe in (("alice", a), ("carol", c)):
            with pytest.raises(DataLoss, match="replayed"):
                vault.verify("c", name, probe.tolist())
        with pytest.raises(DataLoss):
            vault.identify("c", c.tolist())
    finally:
        vault.close()


def test_tampered_collection_record_is_data_loss(vault: Vault, hsm_config: HsmConfig, lfw) -> None:
    a, _ = _enroll_two(vault, lfw, into_blocks=False)
    db = sqlite3.connect(vault.store.path)
    with db:
        db.execute("UPDATE collections SET threshold=-1.0")  # accept everyone
    db.close()
    vault = _reopen(vault, hsm_config)
    try:
        with pytest.raises(DataLoss):
            vault.identify("c", a.tolist())
    finally:
        vault.close()


def test_a_forged_or_missing_commitment_is_data_loss(vault: Vault, hsm_config: HsmConfig,
                                                      lfw) -> None:
    """The state row itself: changed under a running vault, the next write refuses to build
    on it and writes nothing; deleted while it is stopped, the collection is DATA_LOSS."""
    a, b = _enroll_two(vault, lfw, into_blocks=False)
    db = sqlite3.connect(vault.store.path)
    with db:
        db.execute("UPDATE collection_state SET digest=zeroblob(32)")
    count = db.execute("SELECT count(*) FROM templates").fetchone()[0]
    with pytest.raises(DataLoss, match="commitment"):
        vault.enroll("c", "carol", lfw["emb"][9].tolist())
    assert db.execute("SELECT count(*) FROM templates").fetchone()[0] == count
    vault.close()
    with db:
        db.execute("DELETE FROM collection_state")
    db.close()
    vault = _open(vault.store.path.parent, hsm_config)
    try:
        assert "c" in vault.damaged()
        for call in (lambda: vault.verify("c", "alice", a.tolist()),
                     lambda: vault.identify("c", b.tolist())):
            with pytest.raises(DataLoss, match="commitment is missing"):
                call()
    finally:
        vault.close()


def test_a_subject_can_be_deleted_from_a_collection_whose_set_failed(
        vault: Vault, hsm_config: HsmConfig, lfw) -> None:
    """An erasure request must not wait for a repair: DeleteSubject still works (and the
    collection stays DATA_LOSS for everything else)."""
    _, b = _enroll_two(vault, lfw, into_blocks=True)
    alice = vault.integrity.subject_index("c", "alice")
    vault.close()
    db = sqlite3.connect(vault.store.path)
    with db:
        db.execute("DELETE FROM templates WHERE subject_hmac=?", (alice,))
    db.close()
    vault = _open(vault.store.path.parent, hsm_config)
    try:
        with pytest.raises(DataLoss, match="deleted, restored or replayed"):
            vault.verify("c", "bob", b.tolist())
        assert vault.delete_subject("c", "bob") == 1
        with pytest.raises(DataLoss):
            vault.identify("c", b.tolist())
    finally:
        vault.close()


@pytest.mark.parametrize("in_blocks", [False, True], ids=["page", "block"])
def test_a_deleted_subject_restored_from_an_old_copy_never_matches(
        vault: Vault, hsm_config: HsmConfig, lfw, in_blocks: bool) -> None:
    """Bob is deleted; before his values are erased, a writer puts back his rows (valid
    MACs) from an older copy of vault.db: while the vault runs, and after a restart."""
    _, b = _enroll_two(vault, lfw, in_blocks)
    old = vault.store.path.parent.parent / "old.db"
    src = sqlite3.connect(vault.store.path)
    with sqlite3.connect(old) as dst:
        src.backup(dst)
    bob = vault.integrity.subject_index("c", "bob")
    vault.delete_subject("c", "bob")
    db = sqlite3.connect(vault.store.path)
    copy = sqlite3.connect(old)
    with db:
        for table in ("templates", "subjects"):
            for row in copy.execute(f"SELECT * FROM {table} WHERE subject_hmac=?", (bob,)):
                db.execute(f"INSERT OR REPLACE INTO {table} VALUES ({','.join('?' * len(row))})",
                           row)
    db.close()
    # Running: the restored rows and the vault's memory disagree; bob is never named.
    with pytest.raises(DataLoss, match="integrity"):
        vault.verify("c", "bob", b.tolist())
    found = vault.identify("c", b.tolist(), threshold=-1.0, top_k=2)
    assert "bob" not in [c.subject_id for c in found.candidates]
    # Restarted: the rows are not the set the collection committed to.
    vault = _reopen(vault, hsm_config)
    with pytest.raises(DataLoss, match="deleted, restored or replayed"):
        vault.verify("c", "bob", b.tolist())
    with pytest.raises(DataLoss, match="deleted, restored or replayed"):
        vault.identify("c", b.tolist(), threshold=-1.0, top_k=2)
    vault.close()
    copy.close()
    src.close()


def test_parallel_writers_keep_the_commitment_exact(vault: Vault, hsm_config: HsmConfig) -> None:
    """Enrollments, imports, deletions and maintenance passes at once: every transaction
    folds its own change into the digest, so the reopened vault finds its set intact."""
    from concurrent.futures import ThreadPoolExecutor

    from vault.ops.imports import ImportItem

    vault.create_collection("c", 32, 0.9)
    faces = np.random.default_rng(7).standard_normal((60, 32))

    def enroll(k: int) -> None:
        vault.enroll("c", f"e{k}", faces[k].tolist())
        if k % 3 == 0:
            vault.delete_subject("c", f"e{k}")

    def bulk(start: int) -> None:
        session = vault.start_import("c")
        session.add([ImportItem(f"i{k}", faces[k].tolist()) for k in range(start, start + 10)])
        session.finish()

    with ThreadPoolExecutor(max_workers=4) as pool:
        jobs = [pool.submit(enroll, k) for k in range(30)]
        jobs += [pool.submit(bulk, s) for s in (30, 40, 50)]
        jobs += [pool.submit(vault.maintain, True) for _ in range(3)]
        for job in jobs:
            job.result()
    vault = _reopen(vault, hsm_config)
    try:
        assert vault.damaged() == {} and vault.integrity_events == []
        assert vault.get_collection("c").template_count == 30 - 10 + 30
        assert vault.verify("c", "e1", faces[1].tolist()).matched
    finally:
        vault.close()
