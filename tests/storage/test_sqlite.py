"""The store's schema version lives in SQLite's header (user_version): older databases are
migrated in the transaction that opens them, newer ones refused with nothing written."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from vault.domain.errors import Unavailable
from vault.storage import sqlite as schema
from vault.storage.templates import UNERASED_QUERY
from vault.store import Store


def _version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_a_new_database_is_at_the_current_version(tmp_path: Path) -> None:
    Store(tmp_path / "vault.db").close()
    assert _version(tmp_path / "vault.db") == schema.SCHEMA_VERSION


def test_a_database_from_before_user_version_opens_at_its_meta_version(tmp_path: Path) -> None:
    """What earlier releases wrote: user_version 0, the version in the meta table."""
    path = tmp_path / "vault.db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=0")
        db.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)",
                   (schema.SCHEMA_VERSION,))
    Store(path).close()
    assert _version(path) == schema.SCHEMA_VERSION


def test_an_older_database_is_migrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vault.db"
    Store(path).close()
    current = schema.SCHEMA_VERSION
    monkeypatch.setattr(schema, "SCHEMA_VERSION", current + 1)
    monkeypatch.setattr(schema, "_MIGRATIONS", {
        current: ("ALTER TABLE collections ADD COLUMN note TEXT NOT NULL DEFAULT ''",)})
    Store(path).close()
    assert _version(path) == current + 1
    with sqlite3.connect(path) as db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(collections)")]
    assert "note" in columns


def test_a_failed_migration_leaves_the_database_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vault.db"
    Store(path).close()
    current = schema.SCHEMA_VERSION
    monkeypatch.setattr(schema, "SCHEMA_VERSION", current + 1)
    monkeypatch.setattr(schema, "_MIGRATIONS", {current: (
        "ALTER TABLE collections ADD COLUMN note TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE no_such_table ADD COLUMN x INTEGER")})
    with pytest.raises(sqlite3.OperationalError):
        Store(path)
    assert _version(path) == current
    with sqlite3.connect(path) as db:
        assert "note" not in [r[1] for r in db.execute("PRAGMA table_info(collections)")]


def test_a_newer_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={schema.SCHEMA_VERSION + 1}")
    before = path.read_bytes()
    with pytest.raises(Unavailable, match=f"version {schema.SCHEMA_VERSION + 1} is newer"):
        Store(path)
    assert path.read_bytes() == before


def test_a_version_without_migration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=1")
    with pytest.raises(Unavailable, match="version 1 has no migration"):
        Store(path)


def _plan(path: Path) -> str:
    with sqlite3.connect(path) as db:  # the query TemplateRecords.unerased runs
        return " ".join(str(r[-1]) for r in db.execute(f"EXPLAIN QUERY PLAN {UNERASED_QUERY}", ("c", 1)))


def test_tombstones_are_found_without_scanning_every_template(tmp_path: Path) -> None:
    """The maintenance pass's look for unerased tombstones reads the partial index (it
    scanned every row: 0.6 s at a million templates, every few seconds), and a
    version-4 database gets the index when it opens."""
    path = tmp_path / "vault.db"
    Store(path).close()
    assert "templates_unerased" in _plan(path)
    with sqlite3.connect(path) as db:  # as version 4 was
        db.execute("DROP INDEX templates_unerased")
        db.execute("ALTER TABLE collections DROP COLUMN revision")
        db.execute("PRAGMA user_version=4")
    assert "templates_unerased" not in _plan(path)
    Store(path).close()
    assert "templates_unerased" in _plan(path) and _version(path) == schema.SCHEMA_VERSION
