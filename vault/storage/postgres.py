"""The PostgreSQL engine (psycopg 3): the same tables as SQLite, for replicas that share
one database, plus the block ciphertexts themselves (``block_data``, see
:class:`vault.block_files.BlockBlobs`) so that any node rebuilds its state from it.

- Durability: an acknowledged write is committed. At connect the server's ``fsync`` and
  ``synchronous_commit`` are read and a server that could lose a committed transaction
  (``fsync=off``, ``synchronous_commit=off``) is refused.
- One writer at a time: every write transaction first takes one transaction-scoped
  advisory lock, so the live-set ledger's read-modify-write of a commitment is never
  interleaved with another process's (what SQLite's ``BEGIN IMMEDIATE`` gives the file).
  Reads run outside it and see committed rows only.
- Migrations: the version is the one row of ``schema_version``; an older database is
  migrated in the transaction that opens it, a newer one refused untouched.
- A lost connection (the server restarted) is replaced at the next call; meanwhile calls
  fail with :class:`Unavailable`. A connection lost at COMMIT leaves the outcome unknown:
  the engine asks the server (``txid_status``) once it is back, so the caller learns
  whether the write was committed (the vault's memory must not diverge from the rows); if
  the server stays away, writes are refused until the vault restarts and reloads.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from vault import logs
from vault.domain.errors import Refused, ResourceExhausted, Unavailable
from vault.storage import sqlite
from vault.storage.errors import CommitUnknown

SCHEMA_VERSION = sqlite.SCHEMA_VERSION
# _MIGRATIONS[v]: the statements that take a PostgreSQL database from version v to v + 1.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    4: (sqlite.UNERASED_INDEX,),
    5: (sqlite.REVISION_COLUMN.replace("INTEGER", "BIGINT"),),
}
log = logs.get("vault.storage")

# The advisory lock every write transaction holds ("vault" in ASCII).
WRITE_LOCK = 0x7661756C74
# Tables of replication, made by every version that opens the database (the rows of the
# other tables do not depend on them; an older vault ignores them).
_REPLICATION = (
    # The change feed: which pages, blocks and collections each write transaction touched.
    # Written under WRITE_LOCK, so ``seq`` increases in commit order.
    ("CREATE TABLE IF NOT EXISTS changes (seq BIGSERIAL PRIMARY KEY, collection_id TEXT NOT "
     "NULL, key_version BIGINT NOT NULL, tier BIGINT NOT NULL, loc BIGINT NOT NULL, "
     "at TIMESTAMPTZ NOT NULL DEFAULT now())"),
    # The write lease (vault.storage.lease): who may change gallery state, and its term.
    ("CREATE TABLE IF NOT EXISTS write_lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
     "term BIGINT NOT NULL, expires_at TIMESTAMPTZ NOT NULL)"),
    # 1:1 attempts being evaluated, by every replica (vault.attempts): counted against the
    # lockout with the recorded failures. ``expires``: a replica that died mid-evaluation.
    ("CREATE TABLE IF NOT EXISTS attempts_in_flight (reservation TEXT PRIMARY KEY, "
     "collection_id TEXT NOT NULL, subject_hmac BYTEA NOT NULL, credential_hmac BYTEA NOT "
     "NULL, expires DOUBLE PRECISION NOT NULL)"),
    ("CREATE INDEX IF NOT EXISTS attempts_in_flight_by_pair ON attempts_in_flight "
     "(collection_id, subject_hmac, credential_hmac)"),
)
# The advisory lock a starting vault holds while it makes or reads its keys ("start").
START_LOCK = 0x7374617274
# How long a COMMIT whose connection was lost waits for the server to say what happened.
RESOLVE_SECONDS = 30.0


def _schema() -> list[str]:
    """SQLite's tables in PostgreSQL's types (one definition of the columns for both)."""
    ddl = re.sub(r"\bBLOB\b", "BYTEA", sqlite.SCHEMA)
    ddl = re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl)
    ddl = re.sub(r"\bINTEGER\b", "BIGINT", ddl)
    statements = [s.strip() for s in ddl.split(";") if s.strip()]
    return statements + [
        # SQLite orders key jobs by rowid; PostgreSQL has no stable row order of its own.
        "ALTER TABLE key_jobs ADD COLUMN seq BIGSERIAL",
        # A block generation's bytes (the file format of vault.block_files), named like
        # its file; ``written`` lets the start-up sweep spare another replica's write in
        # flight (a blob is written, then the row naming it commits).
        ("CREATE TABLE block_data (name TEXT PRIMARY KEY, data BYTEA NOT NULL, "
         "written TIMESTAMPTZ NOT NULL DEFAULT now())"),
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        # Ciphertexts do not compress: without this, each write spends its time in pglz
        # (a 12 MiB block: 1.5 s compressing for nothing, 0.34 s stored as it is).
        "ALTER TABLE block_data ALTER COLUMN data SET STORAGE EXTERNAL",
        "ALTER TABLE pages ALTER COLUMN ciphertext SET STORAGE EXTERNAL",
    ]


@lru_cache(maxsize=512)
def _sql(statement: str) -> str:
    """The shared SQL's ``?`` placeholders in psycopg's style (no statement holds a ``%``)."""
    return statement.replace("?", "%s")


@contextmanager
def _storage_errors(what: str = "nothing was written") -> Iterator[None]:
    """Map PostgreSQL failures of the medium to precise, data-free vault errors."""
    try:
        yield
    except pg_errors.DiskFull as exc:
        raise ResourceExhausted(f"storage is full: the database has no space left; {what}") from exc
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise Unavailable(f"storage unavailable (the PostgreSQL connection failed: "
                          f"{type(exc).__name__}); {what}") from exc


class _Db:
    """What the storage modules call inside a transaction (sqlite3.Connection's subset)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, statement: str, args: tuple[Any, ...] = ()) -> psycopg.Cursor[Any]:
        cur = self._conn.cursor(binary=True)
        cur.execute(_sql(statement), args or None)
        return cur

    def executemany(self, statement: str, rows: Iterable[tuple[Any, ...]]) -> None:
        rows = list(rows)
        if rows:
            self._conn.cursor(binary=True).executemany(_sql(statement), rows)


class PostgresReader:
    """A read connection of one thread, replaced if the server dropped it."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self.raw = connect()

    def query(self, statement: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Run one read statement; every row (a dead connection is replaced once)."""
        with _storage_errors("nothing was read"):
            for attempt in (0, 1):
                if self.raw.closed or self.raw.broken:
                    self.raw = self._connect()
                try:
                    return self.raw.cursor(binary=True).execute(
                        _sql(statement), args or None).fetchall()
                except psycopg.OperationalError:
                    if attempt or not self.raw.broken:
                        raise
        raise AssertionError("unreachable")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """This connection's reads inside one REPEATABLE READ, READ ONLY transaction: every
        statement sees the same committed state (a replica's refresh, vault.ops.follow)."""
        with _storage_errors("nothing was read"):
            if self.raw.closed or self.raw.broken:
                self.raw = self._connect()
            self.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield
        finally:
            with _storage_errors("nothing was read"):
                if not self.raw.broken and self.raw.info.transaction_status != TransactionStatus.IDLE:
                    self.raw.execute("COMMIT")

    def close(self) -> None:
        """Close the connection."""
        self.raw.close()

    def __del__(self) -> None:  # its thread ended (the thread's locals went)
        if getattr(self, "raw", None) is not None:  # (not if the connect failed)
            self.raw.close()


class PostgresEngine:
    """One psycopg connection in autocommit mode; transactions are explicit."""

    kind = "postgresql"
    insert_order = "seq"
    feeds_changes = True  # replicas follow the ``changes`` feed (vault.ops.follow)

    def __init__(self, url: str) -> None:
        self.url = url
        self.unresolved: int | None = None  # a transaction whose COMMIT outcome is unknown
        self.raw = self._connect()
        try:
            with self.transaction() as db:
                _migrate(db)
        except BaseException:
            self.raw.close()
            raise

    def _connect(self) -> psycopg.Connection[Any]:
        with _storage_errors("the database could not be reached"):
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                        for name in ("fsync", "synchronous_commit")}
        if settings["fsync"] != "on" or settings["synchronous_commit"] == "off":
            conn.close()
            raise Refused(f"PostgreSQL would not keep acknowledged writes (fsync="
                          f"{settings['fsync']}, synchronous_commit="
                          f"{settings['synchronous_commit']}): set fsync=on and "
                          "synchronous_commit=on for this database")
        return conn

    def _live(self) -> psycopg.Connection[Any]:
        """The connection, replaced if the server dropped it (a restart, a failover)."""
        if self.raw.closed or self.raw.broken:
            self.raw = self._connect()
        return self.raw

    def close(self) -> None:
        """Close the connection."""
        self.raw.close()

    def _begin(self) -> psycopg.Connection[Any]:
        """BEGIN on a live connection: one found dead at BEGIN (nothing done yet) is
        replaced once, so the first call after a server restart does not fail."""
        if self.unresolved is not None:
            outcome = self._outcome(self.unresolved)
            if outcome is False:  # it did not commit: memory and rows agree, carry on
                log.info("the earlier write's outcome is known: it was not committed")
                self.unresolved = None
            elif outcome is True:
                raise Unavailable("storage unavailable: an earlier write whose answer was lost "
                                  "was committed; restart the vault to reload it; nothing was "
                                  "written")
            else:
                raise Unavailable("storage unavailable: the outcome of an earlier write is "
                                  "unknown (PostgreSQL does not answer); nothing was written")
        for attempt in (0, 1):
            conn = self._live()
            try:
                conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                return conn
            except psycopg.OperationalError:
                if attempt or not conn.broken:
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self) -> Iterator[_Db]:
        """A write transaction holding the database's write lock; rolled back on any
        exception (a connection lost before COMMIT writes nothing)."""
        with _storage_errors():
            conn = self._begin()
            try:
                xid = int(conn.execute("SELECT txid_current() FROM pg_advisory_xact_lock(%s)",
                                       (WRITE_LOCK,)).fetchone()[0])  # type: ignore[index]
                yield _Db(conn)
            except BaseException:
                if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
                    try:
                        conn.execute("ROLLBACK")
                    except psycopg.Error:
                        pass
                raise
        try:
            conn.execute("COMMIT")
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if not self._committed(xid):  # lost at COMMIT: the server says what happened
                raise Unavailable("storage unavailable (the PostgreSQL connection failed at "
                                  "commit); nothing was written") from exc

    def _committed(self, xid: int) -> bool:
        """Whether transaction ``xid`` committed, asked of the server once it answers again;
        if it does not within RESOLVE_SECONDS, writes are refused (:attr:`unresolved`) until
        it answers (then a write that did not commit is forgotten, one that did needs a
        restart: memory lacks it)."""
        deadline = time.monotonic() + RESOLVE_SECONDS
        while True:
            outcome = self._outcome(xid)
            if outcome is not None:
                return outcome
            if time.monotonic() > deadline:
                self.unresolved = xid
                log.error("storage: a write's outcome is unknown; writes refused until "
                          "PostgreSQL answers")
                raise CommitUnknown("storage unavailable: PostgreSQL was lost at commit and did "
                                  "not come back; the outcome is unknown, writes are refused "
                                  "until it answers")
            time.sleep(0.5)

    def _outcome(self, xid: int) -> bool | None:
        """True (committed) or False (not) when the server can tell; None while it does not
        answer or still runs the transaction. A server restarted by a crash may never have
        logged ``xid``, and would then hand that number out again: an xid at or above the
        next one it assigns is one it never saw (not committed), and is not asked about
        (``txid_status`` of it would be an error, or later another transaction's status)."""
        try:
            found = self._live().execute(
                # txid_current() here takes the next xid: ours is below it if assigned.
                "SELECT CASE WHEN %s >= txid_current() THEN 'never seen' ELSE txid_status(%s) "
                "END", (xid, xid)).fetchone()
        except (psycopg.Error, Unavailable):
            return None
        status = found[0] if found is not None else None
        if status in (None, "in progress"):
            return None
        return bool(status == "committed")

    @contextmanager
    def exclusive_start(self) -> Iterator[None]:
        """A session advisory lock on this engine's connection while a vault initialises:
        replicas started at once on a new database make one set of keys, not one each
        (the second finds the first's and uses them)."""
        with _storage_errors("the database could not be reached"):
            self._live().execute("SELECT pg_advisory_lock(%s)", (START_LOCK,))
        try:
            yield
        finally:
            try:
                self.raw.execute("SELECT pg_advisory_unlock(%s)", (START_LOCK,))
            except psycopg.Error:
                pass  # the connection went, and the session lock with it

    def reader(self) -> PostgresReader:
        """A new read connection (one per thread, see vault.storage.connection)."""
        return PostgresReader(self._connect)

    def execute(self, statement: str, args: tuple[Any, ...] = ()) -> int:
        """Run one statement in its own (committed) transaction; the rows it changed."""
        with _storage_errors():
            return self._live().cursor(binary=True).execute(_sql(statement), args or None).rowcount

    def trim_log(self) -> bool:
        """Nothing to trim: PostgreSQL's WAL is the server's, recycled by its checkpoints."""
        return True

    def checkpoint_wal(self) -> None:
        """VACUUM the tables that held erased values: their dead row versions' space is
        freed for reuse (PostgreSQL does not zero it, see docs/SECURITY.md)."""
        with _storage_errors("nothing was vacuumed"):
            conn = self._live()
            for table in ("templates", "pages", "blocks", "subjects", "block_data"):
                conn.execute(f"VACUUM {table}")


def _one(db: _Db, statement: str) -> Any:
    row = db.execute(statement).fetchone()
    if row is None:
        raise Unavailable("the database's schema_version table is empty: it was damaged")
    return row[0]


def _migrate(db: _Db) -> None:
    """Create a new database at SCHEMA_VERSION, or migrate an older one to it."""
    exists = _one(db, "SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        for statement in _schema():
            db.execute(statement)
        db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        _replication(db)
        return
    version = int(_one(db, "SELECT version FROM schema_version"))
    if version > SCHEMA_VERSION:
        raise Unavailable(f"database schema version {version} is newer than this vault's "
                          f"({SCHEMA_VERSION}): open it with the vault that wrote it")
    while version < SCHEMA_VERSION:
        if version not in _MIGRATIONS:
            raise Unavailable(f"database schema version {version} has no migration to "
                              f"{SCHEMA_VERSION}: this vault cannot open it")
        for statement in _MIGRATIONS[version]:
            db.execute(statement)
        version += 1
    db.execute("UPDATE schema_version SET version=?", (version,))
    _replication(db)


def _replication(db: _Db) -> None:
    for statement in _REPLICATION:
        db.execute(statement)
