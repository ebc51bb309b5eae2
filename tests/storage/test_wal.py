"""Bytes at rest: the SQLite WAL does not stay at a bulk write's high-water mark."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from vault.ops.imports import ImportItem
from vault.service import Vault
from vault.storage.sqlite import WAL_SIZE_LIMIT, SqliteEngine


def _wal(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_a_large_transaction_leaves_the_wal_at_the_limit_after_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    engine = SqliteEngine(path)
    reader = engine.reader()  # an idle reader does not keep the WAL from restarting
    try:
        rng = np.random.default_rng(0)
        with engine.transaction() as db:
            for i in range(48):  # 24 MiB of page images in one transaction
                db.execute("INSERT INTO meta(key, value) VALUES (?, ?)",
                           (f"k{i}", rng.bytes(512 << 10)))
        assert _wal(path) > WAL_SIZE_LIMIT  # the premise: SQLite keeps its high-water mark
        assert reader.query("SELECT count(*) FROM meta WHERE key LIKE 'k%'") == [(48,)]
        with engine.transaction() as db:
            db.execute("INSERT INTO meta(key, value) VALUES ('small', x'00')")
        assert 0 < _wal(path) <= WAL_SIZE_LIMIT
        assert engine.trim_log()
        assert _wal(path) == 0
    finally:
        reader.close()
        engine.close()
    with sqlite3.connect(path) as db:  # nothing was lost on the way
        assert db.execute("SELECT count(*) FROM meta WHERE key LIKE 'k%' OR key = 'small'"
                          ).fetchone() == (49,)


def test_an_import_does_not_leave_its_wal_at_rest(vault: Vault, tmp_path: Path) -> None:
    """The import's rows are in the main file, and its WAL is given back when it finishes
    (without the trim it was left at several MiB here, 343 MB at a million templates)."""
    path = tmp_path / "data" / "vault.db"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6000, 32))
    vault.create_collection("c", 32, 0.5)
    before = path.stat().st_size
    session = vault.start_import("c")
    for start in range(0, len(x), 1000):
        session.add([ImportItem(f"s{i}", x[i].tolist(), request_id=f"r{i}")
                     for i in range(start, start + 1000)])
    assert all(r.error is None for r in session.finish())
    assert _wal(path) <= 64 << 10
    assert path.stat().st_size - before > 2 << 20  # the rows (and their indexes) are here
    assert vault.verify("c", "s17", x[17].tolist()).matched
