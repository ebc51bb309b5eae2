"""Someone with write access to the PostgreSQL database (a login, psql): swap, flip,
strip, delete and replay rows, block data included. As on SQLite (tests/test_tamper.py),
each attack is caught: DATA_LOSS, never a silent match or non-match."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from vault.domain.errors import DataLoss
from vault.keys.hsm import HsmConfig
from vault.service import Tuning, Vault

TUNING = Tuning(maintenance_interval=0, workers=0)
Attack = Callable[[psycopg.Connection], None]  # type: ignore[type-arg]


def _open(data: Path, url: str, hsm_config: HsmConfig) -> Vault:
    return Vault.open(data, hsm_config, store_url=url, tuning=TUNING)


def _swap_subjects(db: psycopg.Connection) -> None:  # type: ignore[type-arg]
    (ta, sa), (tb, sb) = db.execute("SELECT template_id, subject_hmac FROM templates").fetchall()
    db.execute("UPDATE templates SET subject_hmac=%s WHERE template_id=%s", (sb, ta))
    db.execute("UPDATE templates SET subject_hmac=%s WHERE template_id=%s", (sa, tb))


def _strip_macs(db: psycopg.Connection) -> None:  # type: ignore[type-arg]
    db.execute("UPDATE templates SET mac=''::bytea")


def _flip_page_byte(db: psycopg.Connection) -> None:  # type: ignore[type-arg]
    db.execute("UPDATE pages SET ciphertext = set_byte(ciphertext, length(ciphertext) / 3, "
               "get_byte(ciphertext, length(ciphertext) / 3) # 1)")


def _flip_block_byte(db: psycopg.Connection) -> None:  # type: ignore[type-arg]
    db.execute("UPDATE block_data SET data = set_byte(data, length(data) / 2, "
               "get_byte(data, length(data) / 2) # 1)")


def _delete_a_template(db: psycopg.Connection) -> None:  # type: ignore[type-arg]
    db.execute("DELETE FROM templates WHERE template_id = (SELECT min(template_id) FROM templates)")


ATTACKS: list[tuple[Attack, bool]] = [
    (_swap_subjects, False), (_strip_macs, False), (_flip_page_byte, False),
    (_delete_a_template, False), (_swap_subjects, True), (_flip_block_byte, True),
    (_delete_a_template, True)]


@pytest.mark.parametrize("attack, in_blocks", ATTACKS,
                         ids=[f"{a.__name__.strip('_')}-{'block' if b else 'page'}" for a, b in ATTACKS])
def test_tampering_in_postgresql_is_detected_and_never_matches(
        tmp_path: Path, pg_url: str, hsm_config: HsmConfig, lfw, attack: Attack,
        in_blocks: bool) -> None:
    vault = _open(tmp_path / "data", pg_url, hsm_config)
    vault.create_collection("c", 128, 0.9)
    a, b = lfw["emb"][0], lfw["emb"][5]
    vault.enroll("c", "alice", a.tolist())
    vault.enroll("c", "bob", b.tolist())
    if in_blocks:
        vault.maintain(force=True)  # checkpoint: the journal page moves into a block
    vault.close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        attack(db)
    vault = _open(tmp_path / "data", pg_url, hsm_config)
    try:
        with pytest.raises(DataLoss):
            vault.verify("c", "alice", a.tolist())
        for probe in (a, b):  # a tampered record is never named, nor silently skipped
            with pytest.raises(DataLoss):
                vault.identify("c", probe.tolist(), top_k=2, threshold=-1.0)
        assert vault.integrity_events
    finally:
        vault.close()


def test_an_old_block_replayed_in_postgresql_is_detected(tmp_path: Path, pg_url: str,
                                                         hsm_config: HsmConfig, lfw) -> None:
    vault = _open(tmp_path / "data", pg_url, hsm_config)
    vault.create_collection("c", 128, 0.9)
    a, c = lfw["emb"][0], lfw["emb"][9]
    vault.enroll("c", "alice", a.tolist())
    vault.maintain(force=True)
    with psycopg.connect(pg_url, autocommit=True) as db:
        old_rows = db.execute("SELECT * FROM blocks").fetchall()
        old_data = db.execute("SELECT name, data FROM block_data").fetchall()
    vault.enroll("c", "carol", c.tolist())
    vault.maintain(force=True)  # carol moves into the same block: a new generation
    vault.close()
    with psycopg.connect(pg_url, autocommit=True) as db, db.transaction():
        db.execute("DELETE FROM blocks")
        db.cursor().executemany("INSERT INTO blocks VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                                old_rows)
        db.cursor().executemany("INSERT INTO block_data(name, data) VALUES (%s,%s) "
                                "ON CONFLICT (name) DO UPDATE SET data=excluded.data", old_data)
    vault = _open(tmp_path / "data", pg_url, hsm_config)
    try:
        for name, probe in (("alice", a), ("carol", c)):
            with pytest.raises(DataLoss, match="replayed"):
                vault.verify("c", name, probe.tolist())
        with pytest.raises(DataLoss):
            vault.identify("c", c.tolist())
    finally:
        vault.close()


def test_a_threshold_lowered_under_a_running_vault_is_data_loss(
        tmp_path: Path, pg_url: str, hsm_config: HsmConfig, lfw) -> None:
    vault = _open(tmp_path / "data", pg_url, hsm_config)
    try:
        vault.create_collection("c", 128, 0.9)
        a = lfw["emb"][0]
        vault.enroll("c", "alice", a.tolist())
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute("UPDATE collections SET threshold=-1.0")  # accept everyone
        with pytest.raises(DataLoss):
            vault.identify("c", lfw["emb"][5].tolist())
    finally:
        vault.close()
