"""The PostgreSQL store on a real PostgreSQL server: versioned migrations, the durability
check at connect, two writers on one database (the live-set commitment must stay whole),
block generations as rows, and a server restart under an open store."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import psycopg
import pytest

from vault.block_files import BlockBlobs, BlockFiles
from vault.domain.errors import Refused, Unavailable
from vault.domain.records import (
    LIVE,
    PAGE,
    AttemptRow,
    CollectionKeyRow,
    CollectionRow,
    TemplateRow,
)
from vault.keys.hsm import Hsm
from vault.keys.integrity import Integrity, LiveSet
from vault.storage import postgres as schema
from vault.store import Store
from vault.testing import PostgresServer


def _sql(url: str, statement: str) -> list[tuple[object, ...]]:
    """What anyone with a login to the database can run."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


def test_a_new_database_is_at_the_current_version(pg_url: str) -> None:
    Store(pg_url).close()
    assert _sql(pg_url, "SELECT version FROM schema_version") == [(schema.SCHEMA_VERSION,)]
    Store(pg_url).close()  # and opens again as it is


def test_an_older_database_is_migrated(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(pg_url).close()
    current = schema.SCHEMA_VERSION
    monkeypatch.setattr(schema, "SCHEMA_VERSION", current + 1)
    monkeypatch.setattr(schema, "_MIGRATIONS", {
        current: ("ALTER TABLE collections ADD COLUMN note TEXT NOT NULL DEFAULT ''",)})
    Store(pg_url).close()
    assert _sql(pg_url, "SELECT version FROM schema_version") == [(current + 1,)]
    assert _sql(pg_url, "SELECT note FROM collections") == []


def test_a_version_5_database_gains_the_collection_revision(pg_url: str) -> None:
    Store(pg_url).close()
    _sql(pg_url, "ALTER TABLE collections DROP COLUMN revision")
    _sql(pg_url, "UPDATE schema_version SET version=5")
    _sql(pg_url, "INSERT INTO collections(collection_id, dimension, threshold, key_version, "
                 "min_key_version, mac) VALUES ('old', 8, 0.9, 1, 1, 'mac')")
    store = Store(pg_url)
    try:
        row = store.collection("old")
        assert row is not None and row.revision == 0  # a legacy row: its MAC covers none
    finally:
        store.close()
    assert _sql(pg_url, "SELECT version FROM schema_version") == [(schema.SCHEMA_VERSION,)]


def test_a_failed_migration_leaves_the_database_as_it_was(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(pg_url).close()
    current = schema.SCHEMA_VERSION
    monkeypatch.setattr(schema, "SCHEMA_VERSION", current + 1)
    monkeypatch.setattr(schema, "_MIGRATIONS", {current: (
        "ALTER TABLE collections ADD COLUMN note TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE no_such_table ADD COLUMN x INTEGER")})
    with pytest.raises(psycopg.errors.UndefinedTable):
        Store(pg_url)
    assert _sql(pg_url, "SELECT version FROM schema_version") == [(current,)]
    columns = _sql(pg_url, "SELECT column_name FROM information_schema.columns "
                           "WHERE table_name='collections'")
    assert ("note",) not in columns


def test_a_newer_database_is_refused_and_left_untouched(pg_url: str) -> None:
    Store(pg_url).close()
    _sql(pg_url, f"UPDATE schema_version SET version={schema.SCHEMA_VERSION + 1}")
    with pytest.raises(Unavailable, match=f"version {schema.SCHEMA_VERSION + 1} is newer"):
        Store(pg_url)
    assert _sql(pg_url, "SELECT version FROM schema_version") == [(schema.SCHEMA_VERSION + 1,)]


def test_a_database_that_would_not_keep_acknowledged_writes_is_refused(pg_url: str) -> None:
    database = pg_url.rsplit("/", 1)[1]
    _sql(pg_url, f'ALTER DATABASE "{database}" SET synchronous_commit=off')
    with pytest.raises(Refused, match="synchronous_commit=off"):
        Store(pg_url)
    assert _sql(pg_url, "SELECT to_regclass('schema_version')") == [(None,)]  # nothing made


def test_an_unreachable_database_is_unavailable(postgres: PostgresServer) -> None:
    with pytest.raises(Unavailable, match="could not be reached"):
        Store(postgres.url("no_such_database"))


# -- two writers on one database ----------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    if request.param == "sqlite":
        return tmp_path / "vault.db"
    url: str = request.getfixturevalue("pg_url")
    return url


def _ledger(location: str | Path, hsm: Hsm) -> Store:
    store = Store(location)
    store.live_set = LiveSet(b"k" * 32, Integrity(hsm))
    return store


def test_two_writers_keep_the_live_set_commitment_whole(location: str | Path, hsm: Hsm) -> None:
    """Two processes' stores (two connections) write the same collection's rows at once:
    every transaction is folded into the commitment exactly once."""
    stores = [_ledger(location, hsm), _ledger(location, hsm)]
    try:
        stores[0].insert_collection(CollectionRow("c", 128, 0.9, 1, 1, b"mac"),
                                    CollectionKeyRow("c", 1, "{}", b"public", b"sealed"))
        per_writer, errors = 12, []

        def write(w: int) -> None:
            try:
                for n in range(per_writer):
                    subject = bytes([w, n]) * 16
                    stores[w].write_templates([], [], [TemplateRow(
                        f"t{w}-{n}", "c", subject, 1, PAGE, w * 100 + n, 0, subject[::-1], LIVE,
                        0, b"m")], [("c", subject, b"sealed")])
                    stores[w].update_attempts("c", subject, lambda rows, s=subject: AttemptRow(
                        "c", s, b"cred", len(rows) + 1, 0.0, 0.0, b"m"))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(w,)) for w in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        check = stores[1]
        assert check.live_set is not None
        counter, digest, mac = check.live_set_state("c", 1) or (0, b"", b"")
        assert counter == 2 * per_writer  # no transaction's change was lost or doubled
        assert check.live_set.check(mac, "c", 1, counter, digest)
        assert check.live_set_digest("c", 1) == bytes(digest)
        assert check.attempt_set_intact("c")
        assert check.epoch() == 2 * 2 * per_writer  # each write transaction counted once
    finally:
        for s in stores:
            s.close()


# -- block generations as rows ----------------------------------------------------------

def _residues(seed: int) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    moduli = [(1 << 30) - 35, (1 << 40) - 87]
    return [rng.integers(0, q, (2, 2, 64), dtype=np.uint64) for q in moduli], moduli


def test_block_rows_hold_the_same_bytes_and_digest_as_files(pg_url: str, tmp_path: Path) -> None:
    store = Store(pg_url)
    try:
        blobs = store.block_store(tmp_path / "blocks")
        assert isinstance(blobs, BlockBlobs)
        residues, moduli = _residues(1)
        path = blobs.path("c", 1, 0, 1)
        digest = blobs.write(path, residues, moduli)
        files = BlockFiles(tmp_path / "blocks")
        assert files.write(files.path("c", 1, 0, 1), residues, moduli) == digest
        read, read_digest = blobs.read(path)
        assert read_digest == digest
        assert all(np.array_equal(a, b) for a, b in zip(read, residues))
        assert len(blobs.read(path, levels=1)[0]) == 1
        with pytest.raises(FileNotFoundError):
            blobs.read(blobs.path("c", 1, 0, 2))
        # The start-up sweep: an old orphan goes, a young one (a write in flight) and a
        # committed one stay.
        orphan, young = blobs.path("c", 1, 5, 1), blobs.path("c", 1, 6, 1)
        blobs.write(orphan, residues, moduli)
        blobs.write(young, residues, moduli)
        _sql(pg_url, f"UPDATE block_data SET written = now() - interval '2 hours' "
                     f"WHERE name IN ('{path}', '{orphan}')")
        assert blobs.sweep({path}) == 1
        assert {n for (n,) in _sql(pg_url, "SELECT name FROM block_data")} == {str(path), str(young)}
        blobs.erase_collection("c")
        assert _sql(pg_url, "SELECT name FROM block_data") == []
    finally:
        store.close()


# -- the server restarted under an open store -------------------------------------------

def test_a_restarted_server_is_unavailable_then_reconnected(hsm: Hsm) -> None:
    server = PostgresServer().start()
    try:
        store = _ledger(server.create_database(), hsm)
        store.put_wrapped_key("a", 1, b"blob")
        server.stop("immediate")  # as a crash: the store's connection dies with it
        with pytest.raises(Unavailable, match="PostgreSQL connection failed"):
            store.put_wrapped_key("b", 1, b"blob")
        with pytest.raises(Unavailable):
            store.wrapped_key("a", 1)
        server.start()
        assert store.wrapped_key("a", 1) == b"blob"  # committed before the crash
        assert store.wrapped_key("b", 1) is None  # refused while down: nothing written
        store.put_wrapped_key("b", 1, b"blob")
        assert store.wrapped_key("b", 1) == b"blob"
        store.close()
    finally:
        server.close()


# -- a connection lost at COMMIT ----------------------------------------------------------

class _LostAfterCommit:
    """The network fails right after the server committed: the COMMIT's answer is lost."""

    def __init__(self, real: psycopg.Connection) -> None:  # type: ignore[type-arg]
        self._real = real

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def execute(self, statement: str, *args: object) -> object:
        result = self._real.execute(statement, *args)  # type: ignore[call-overload]
        if statement == "COMMIT":
            self._real.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return result


def test_a_commit_whose_answer_was_lost_is_resolved_by_the_server(pg_url: str) -> None:
    store = Store(pg_url)
    try:
        store.engine.raw = _LostAfterCommit(store.engine.raw)
        store.put_wrapped_key("a", 1, b"blob")  # committed: no error, whatever the network did
        assert store.wrapped_key("a", 1) == b"blob"
    finally:
        store.close()


def test_a_connection_killed_before_commit_writes_nothing(pg_url: str) -> None:
    store = Store(pg_url)
    try:
        with (pytest.raises(Unavailable, match="at commit\\); nothing was written"),
              store.transaction() as db):
            db.execute("INSERT INTO wrapped_keys(name, version, blob) VALUES (?,?,?)",
                       ("a", 1, b"blob"))
            pid = store.engine.raw.info.backend_pid
            _sql(pg_url, f"SELECT pg_terminate_backend({pid})")  # an admin, a failover
        assert store.wrapped_key("a", 1) is None
        store.put_wrapped_key("a", 1, b"blob")  # and the store carries on
        assert store.wrapped_key("a", 1) == b"blob"
    finally:
        store.close()


def test_a_lost_commit_is_resolved_by_asking_the_server(pg_url: str) -> None:
    """What the engine concludes about a transaction whose COMMIT answer was lost: the
    server's word for a transaction it knows; and for an xid it never assigned (a crash
    lost the transaction before anything of it was logged, so the restarted server would
    hand the number out again) "not committed", not another transaction's status."""
    store = Store(pg_url)
    try:
        engine = store.engine
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("BEGIN")
            committed = conn.execute("SELECT txid_current()").fetchone()[0]  # type: ignore[index]
            conn.execute("COMMIT")
            conn.execute("BEGIN")
            aborted = conn.execute("SELECT txid_current()").fetchone()[0]  # type: ignore[index]
            conn.execute("ROLLBACK")
            conn.execute("BEGIN")
            running = conn.execute("SELECT txid_current()").fetchone()[0]  # type: ignore[index]
            assert engine._outcome(committed) is True
            assert engine._outcome(aborted) is False
            assert engine._outcome(running) is None  # still running: wait
            assert engine._outcome(running + 10_000) is False  # never assigned here
            conn.execute("ROLLBACK")
        # A write refused while an outcome was unknown goes through once it is known.
        engine.unresolved = aborted
        store.put_wrapped_key("k", 1, b"blob")
        assert engine.unresolved is None and store.wrapped_key("k", 1) == b"blob"
        engine.unresolved = committed
        with pytest.raises(Unavailable, match="restart the vault"):
            store.put_wrapped_key("k", 2, b"blob")
    finally:
        store.close()
