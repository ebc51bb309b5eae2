"""Someone with write access to the SQLite file: swap, flip, replay, strip MACs."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import numpy as np
import pytest

from vault.errors import DataLoss
from vault.keys.hsm import HsmConfig
from vault.service import Vault


def _enroll_two(vault: Vault, lfw) -> tuple[np.ndarray, np.ndarray]:
    vault.create_collection("c", 128, 0.9)
    a, b = lfw["emb"][0], lfw["emb"][5]
    vault.enroll("c", "alice", a.tolist())
    vault.enroll("c", "bob", b.tolist())
    return a, b


def _reopen(vault: Vault, hsm_config: HsmConfig) -> Vault:
    path = vault.store.path
    vault.close()
    return Vault.open(path.parent, hsm_config)


def _swap_subjects(db: sqlite3.Connection) -> None:
    (ta, sa), (tb, sb) = db.execute("SELECT template_id, subject_hmac FROM templates ORDER BY created_at")
    db.execute("UPDATE templates SET subject_hmac=? WHERE template_id=?", (sb, ta))
    db.execute("UPDATE templates SET subject_hmac=? WHERE template_id=?", (sa, tb))


def _swap_slots(db: sqlite3.Connection) -> None:
    (ta, sa), (tb, sb) = db.execute("SELECT template_id, slot FROM templates ORDER BY created_at")
    db.execute("UPDATE templates SET slot=? WHERE template_id=?", (sb, ta))
    db.execute("UPDATE templates SET slot=? WHERE template_id=?", (sa, tb))


def _flip_ciphertext_byte(db: sqlite3.Connection) -> None:
    ct, = db.execute("SELECT ciphertext FROM block_ciphertexts WHERE dim=3").fetchone()
    flipped = bytearray(ct)
    flipped[len(flipped) // 2] ^= 0x01
    db.execute("UPDATE block_ciphertexts SET ciphertext=? WHERE dim=3", (bytes(flipped),))


def _strip_macs(db: sqlite3.Connection) -> None:
    db.execute("UPDATE templates SET mac=x''")


@pytest.mark.parametrize("attack", [_swap_subjects, _swap_slots, _flip_ciphertext_byte, _strip_macs])
def test_tampering_is_detected_and_never_matches(vault: Vault, hsm_config: HsmConfig, lfw,
                                                 attack: Callable[[sqlite3.Connection], None]) -> None:
    a, b = _enroll_two(vault, lfw)
    db = sqlite3.connect(vault.store.path)
    with db:
        attack(db)
    db.close()
    if attack is _flip_ciphertext_byte:
        # Block ciphertexts are matched from memory, written by the vault itself: the
        # running vault still answers correctly; the damaged copy is caught at load.
        assert vault.verify("c", "alice", a.tolist()).matched
    else:
        # Rows are re-read and their MACs re-checked by every 1:1 match.
        with pytest.raises(DataLoss):
            vault.verify("c", "alice", a.tolist())
    # ... and at load: the damaged records are out of the gallery.
    vault = _reopen(vault, hsm_config)
    try:
        with pytest.raises(DataLoss, match="integrity"):
            vault.verify("c", "alice", a.tolist())
        for probe in (a, b):
            found = vault.identify("c", probe.tolist(), top_k=2, threshold=-1.0)
            assert all(c.subject_id != "alice" or np.allclose(probe, a) for c in found.candidates)
    finally:
        vault.close()


def test_replaying_an_old_block_state_is_detected(vault: Vault, hsm_config: HsmConfig, lfw) -> None:
    vault.create_collection("c", 128, 0.9)
    a, c = lfw["emb"][0], lfw["emb"][9]
    vault.enroll("c", "alice", a.tolist())
    db = sqlite3.connect(vault.store.path)
    old_head = db.execute("SELECT * FROM blocks").fetchall()
    old_cts = db.execute("SELECT * FROM block_ciphertexts").fetchall()
    vault.enroll("c", "carol", c.tolist())
    with db:  # put the block back as it was before carol enrolled
        db.execute("DELETE FROM blocks")
        db.execute("DELETE FROM block_ciphertexts")
        db.executemany("INSERT INTO blocks VALUES (?,?,?,?,?,?,?)", old_head)
        db.executemany("INSERT INTO block_ciphertexts VALUES (?,?,?,?,?)", old_cts)
    db.close()
    vault = _reopen(vault, hsm_config)
    try:
        assert vault.verify("c", "alice", a.tolist()).matched
        with pytest.raises(DataLoss):
            vault.verify("c", "carol", c.tolist())
    finally:
        vault.close()


def test_tampered_collection_record_is_data_loss(vault: Vault, hsm_config: HsmConfig, lfw) -> None:
    a, _ = _enroll_two(vault, lfw)
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
