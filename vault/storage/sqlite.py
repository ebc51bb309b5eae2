"""The SQLite engine: schema, pragmas, one write transaction at a time, and the mapping of
the medium's failures to precise vault errors (see vault.store, vault.storage.connection)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vault.domain.errors import ResourceExhausted, Unavailable
from vault.domain.records import DELETED

# The schema's version, kept in SQLite's header (PRAGMA user_version). A database at an
# older version is brought up to it by _MIGRATIONS, in the transaction that opens it;
# a newer one is refused (this vault would not know what the new columns mean).
SCHEMA_VERSION = 6
# Tombstones whose values are still in a ciphertext (DELETED, not yet erased):
# the maintenance pass and the metrics look them up every few seconds, and without this
# index each look scanned every row of the collection (0.6 s at a million, on a core).
# Partial, so it holds only the tombstones; the query names the same literals
# (TemplateRecords.unerased), as a partial index needs.
UNERASED_INDEX = ("CREATE INDEX IF NOT EXISTS templates_unerased ON templates "
                  f"(collection_id, key_version, tier, loc) WHERE state = {DELETED:d} AND erased = 0")
# _MIGRATIONS[v]: the statements that take a database from version v to v + 1.
# 5 -> 6: a collection row's revision (vault.domain.records.CollectionRow).
REVISION_COLUMN = "ALTER TABLE collections ADD COLUMN revision INTEGER NOT NULL DEFAULT 0"
_MIGRATIONS: dict[int, tuple[str, ...]] = {4: (UNERASED_INDEX,), 5: (REVISION_COLUMN,)}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS wrapped_keys (
  name TEXT NOT NULL,
  version INTEGER NOT NULL,
  blob BLOB NOT NULL,
  PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS collections (
  collection_id TEXT PRIMARY KEY,
  dimension INTEGER NOT NULL,
  threshold REAL NOT NULL,
  key_version INTEGER NOT NULL,
  min_key_version INTEGER NOT NULL,
  mac BLOB NOT NULL,
  reference_mean BLOB,
  policy TEXT NOT NULL DEFAULT '',
  revision INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS collection_keys (
  collection_id TEXT NOT NULL,
  key_version INTEGER NOT NULL,
  he_params TEXT NOT NULL,
  public_context BLOB NOT NULL,
  sealed_secret_context BLOB NOT NULL,
  PRIMARY KEY (collection_id, key_version)
);
CREATE TABLE IF NOT EXISTS subjects (
  collection_id TEXT NOT NULL,
  subject_hmac BLOB NOT NULL,
  sealed_subject_id BLOB NOT NULL,
  PRIMARY KEY (collection_id, subject_hmac)
);
CREATE TABLE IF NOT EXISTS templates (
  template_id TEXT NOT NULL,
  collection_id TEXT NOT NULL,
  subject_hmac BLOB NOT NULL,
  key_version INTEGER NOT NULL,
  tier INTEGER NOT NULL,
  loc INTEGER NOT NULL,
  slot INTEGER NOT NULL,
  request_hmac BLOB,
  state INTEGER NOT NULL,
  erased INTEGER NOT NULL,
  mac BLOB NOT NULL,
  PRIMARY KEY (template_id, key_version)
);
CREATE UNIQUE INDEX IF NOT EXISTS templates_by_request ON templates (request_hmac, key_version);
CREATE INDEX IF NOT EXISTS templates_by_subject ON templates (collection_id, subject_hmac);
CREATE INDEX IF NOT EXISTS templates_by_place ON templates (collection_id, key_version, tier, loc, slot);
""" + UNERASED_INDEX + """;
CREATE TABLE IF NOT EXISTS pages (
  collection_id TEXT NOT NULL,
  key_version INTEGER NOT NULL,
  page_no INTEGER NOT NULL,
  generation INTEGER NOT NULL,
  fill INTEGER NOT NULL,
  ciphertext BLOB NOT NULL,
  mac BLOB NOT NULL,
  PRIMARY KEY (collection_id, key_version, page_no)
);
CREATE TABLE IF NOT EXISTS blocks (
  collection_id TEXT NOT NULL,
  key_version INTEGER NOT NULL,
  block_no INTEGER NOT NULL,
  kind INTEGER NOT NULL,
  generation INTEGER NOT NULL,
  levels INTEGER NOT NULL,
  fill INTEGER NOT NULL,
  digest BLOB NOT NULL,
  sketch BLOB,
  mac BLOB NOT NULL,
  PRIMARY KEY (collection_id, key_version, block_no)
);
CREATE TABLE IF NOT EXISTS key_jobs (
  job_id TEXT PRIMARY KEY,
  collection_id TEXT NOT NULL,
  from_version INTEGER NOT NULL,
  to_version INTEGER NOT NULL,
  state TEXT NOT NULL,
  blocks_done INTEGER NOT NULL,
  blocks_total INTEGER NOT NULL,
  error TEXT
);
CREATE TABLE IF NOT EXISTS collection_state (
  collection_id TEXT NOT NULL,
  key_version INTEGER NOT NULL,
  counter INTEGER NOT NULL,
  digest BLOB NOT NULL,
  mac BLOB NOT NULL,
  PRIMARY KEY (collection_id, key_version)
);
CREATE TABLE IF NOT EXISTS verify_attempts (
  collection_id TEXT NOT NULL,
  subject_hmac BLOB NOT NULL,
  credential_hmac BLOB NOT NULL,
  failures INTEGER NOT NULL,
  since REAL NOT NULL,
  locked_until REAL NOT NULL,
  mac BLOB NOT NULL,
  PRIMARY KEY (collection_id, subject_hmac, credential_hmac)
);
"""

def _migrate(db: sqlite3.Connection) -> None:
    """Create a new database at SCHEMA_VERSION, or migrate an older one to it."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    tables = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
    if version == 0 and tables:
        # Databases before user_version kept their version in the meta table.
        found = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(found[0]) if found else 0
    if version > SCHEMA_VERSION:
        raise Unavailable(f"database schema version {version} is newer than this vault's "
                          f"({SCHEMA_VERSION}): open it with the vault that wrote it")
    if not tables:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        version = SCHEMA_VERSION
    while version < SCHEMA_VERSION:
        if version not in _MIGRATIONS:
            raise Unavailable(f"database schema version {version} has no migration to "
                              f"{SCHEMA_VERSION}: this vault cannot open it")
        for statement in _MIGRATIONS[version]:
            db.execute(statement)
        version += 1
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION:d}")


# What the WAL keeps of its high-water mark once it restarts (SQLite reuses the file
# rather than truncating it): a bulk import's transactions grow it to hundreds of MB at a
# million templates, which would otherwise stay at rest. Far above what ordinary writes need.
WAL_SIZE_LIMIT = 16 << 20

# Primary SQLite result codes (the low byte of an extended code).
_SQLITE_FULL = 13
_SQLITE_UNAVAILABLE = {5: "database is locked", 6: "table is locked", 8: "database is read-only",
                       10: "disk I/O error", 14: "cannot open the database file"}


@contextmanager
def _storage_errors() -> Iterator[None]:
    """Map SQLite failures of the medium to precise, data-free vault errors."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code == _SQLITE_FULL:
            raise ResourceExhausted("storage is full: the data directory has no space left; "
                                    "nothing was written") from exc
        if code in _SQLITE_UNAVAILABLE:
            raise Unavailable(f"storage unavailable ({_SQLITE_UNAVAILABLE[code]}); "
                              "nothing was written") from exc
        raise


class SqliteReader:
    """A read-only connection of one thread (WAL: readers do not wait for the writer)."""

    def __init__(self, path: Path) -> None:
        with _storage_errors():
            self.raw = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                       check_same_thread=False, isolation_level=None)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Run one read statement; every row."""
        with _storage_errors():
            return self.raw.execute(sql, args).fetchall()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads of this connection inside one read transaction (one snapshot of the WAL)."""
        with _storage_errors():
            self.raw.execute("BEGIN")
        try:
            yield
        finally:
            with _storage_errors():
                self.raw.execute("COMMIT")

    def close(self) -> None:
        """Close the connection."""
        self.raw.close()

    def __del__(self) -> None:  # its thread ended (the thread's locals went)
        if getattr(self, "raw", None) is not None:  # (not if the connect failed)
            self.raw.close()


class SqliteEngine:
    """One SQLite file: WAL, ``synchronous=FULL``, ``secure_delete``; writes take the
    file's write lock at BEGIN (one writer at a time, as the live-set ledger needs)."""

    kind = "sqlite"
    insert_order = "rowid"  # key_jobs in the order they were made
    feeds_changes = False  # one process per file (DIR/server.pid): no replica to tell

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.raw = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.raw.execute("PRAGMA journal_mode=WAL")
        self.raw.execute("PRAGMA synchronous=FULL")
        self.raw.execute("PRAGMA secure_delete=ON")
        self.raw.execute("PRAGMA foreign_keys=ON")
        self.raw.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT:d}")
        try:
            with self.transaction() as db:
                _migrate(db)
        except BaseException:
            self.raw.close()
            raise

    def close(self) -> None:
        """Close the connection."""
        self.raw.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locking) transaction; rolled back on any exception.

        Storage failures become :class:`ResourceExhausted` (disk full) or
        :class:`Unavailable` (I/O error, locked, read-only): either way nothing was written.
        """
        with _storage_errors():
            self.raw.execute("BEGIN IMMEDIATE")
            try:
                yield self.raw
                self.raw.execute("COMMIT")
            except BaseException:
                if self.raw.in_transaction:  # SQLite may have rolled back by itself already
                    try:
                        self.raw.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise

    @contextmanager
    def exclusive_start(self) -> Iterator[None]:
        """Nothing to hold: DIR/server.pid already keeps other vaults out of the file."""
        yield

    def reader(self) -> SqliteReader:
        """A new read-only connection (one per thread, see vault.storage.connection)."""
        return SqliteReader(self.path)

    def checkpoint_wal(self) -> None:
        """Copy the WAL into the main file and truncate it to zero bytes: older page images
        (a deleted row, a replaced ciphertext) leave the WAL, and the pages they were
        freed from are zeroed in the main file (``secure_delete``)."""
        if not self.trim_log():
            raise Unavailable("the database was busy: its write-ahead log was not truncated")

    def trim_log(self) -> bool:
        """After a bulk write (an import): truncate the WAL to zero bytes now, rather than
        at the next write. False when a reader kept it (it is then trimmed to
        :data:`WAL_SIZE_LIMIT` at a later write, or by the maintenance pass)."""
        with _storage_errors():
            busy, _, _ = self.raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy
