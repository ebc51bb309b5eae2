"""Store: SQLite file with metadata, ciphertexts, wrapped keys.

WAL journal with ``synchronous=FULL`` (an acknowledged write survives power loss) and
``secure_delete`` (freed pages are zeroed, so overwritten ciphertexts and deleted rows do
not linger in the file). Every multi-row change is one transaction: a crash leaves either
the old or the new state, never half of an enrollment.

What is stored, and in what form:

- subject ids: AES-GCM under a data key wrapped by the HSM, found by an HMAC blind index;
- request ids: only their HMAC;
- templates: no values at all, only where their encrypted values sit (block, slot);
- block ciphertexts: CKKS ciphertexts under the collection's public key;
- CKKS secret contexts and data keys: wrapped by the HSM key-encryption key;
- a MAC keyed in the HSM on every template row and every block.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vault.errors import ResourceExhausted, Unavailable

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS wrapped_keys (
  name TEXT NOT NULL,
  version INTEGER NOT NULL,
  blob BLOB NOT NULL,
  created_at REAL NOT NULL,
  PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS collections (
  collection_id TEXT PRIMARY KEY,
  dimension INTEGER NOT NULL,
  threshold REAL NOT NULL,
  key_version INTEGER NOT NULL,
  min_key_version INTEGER NOT NULL,
  created_at REAL NOT NULL,
  mac BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS collection_keys (
  collection_id TEXT NOT NULL,
  key_version INTEGER NOT NULL,
  he_params TEXT NOT NULL,
  public_context BLOB NOT NULL,
  sealed_secret_context BLOB NOT NULL,
  created_at REAL NOT NULL,
  PRIMARY KEY (collection_id, key_version)
);
CREATE TABLE IF NOT EXISTS subjects (
  collection_id TEXT NOT NULL,
  subject_hmac BLOB NOT NULL,
  sealed_subject_id BLOB NOT NULL,
  PRIMARY KEY (collection_id, subject_hmac)
);
CREATE TABLE IF NOT EXISTS templates (
  template_id TEXT PRIMARY KEY,
  collection_id TEXT NOT NULL,
  subject_hmac BLOB NOT NULL,
  key_version INTEGER NOT NULL,
  block_no INTEGER NOT NULL,
  slot INTEGER NOT NULL,
  request_hmac BLOB UNIQUE,
  state INTEGER NOT NULL,
  created_at REAL NOT NULL,
  mac BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS templates_by_subject ON templates (collection_id, subject_hmac);
CREATE INDEX IF NOT EXISTS templates_by_block ON templates (collection_id, key_version, block_no);
CREATE TABLE IF NOT EXISTS blocks (
  collection_id TEXT NOT NULL,
  key_version INTEGER NOT NULL,
  block_no INTEGER NOT NULL,
  generation INTEGER NOT NULL,
  used INTEGER NOT NULL,
  digest BLOB NOT NULL,
  mac BLOB NOT NULL,
  PRIMARY KEY (collection_id, key_version, block_no)
);
CREATE TABLE IF NOT EXISTS verify_attempts (
  collection_id TEXT NOT NULL,
  subject_hmac BLOB NOT NULL,
  failures INTEGER NOT NULL,
  locked_until REAL NOT NULL,
  PRIMARY KEY (collection_id, subject_hmac)
);
CREATE TABLE IF NOT EXISTS block_ciphertexts (
  collection_id TEXT NOT NULL,
  key_version INTEGER NOT NULL,
  block_no INTEGER NOT NULL,
  dim INTEGER NOT NULL,
  ciphertext BLOB NOT NULL,
  PRIMARY KEY (collection_id, key_version, block_no, dim)
);
"""

LIVE = 1
DELETED = 2


@dataclass(frozen=True)
class CollectionRow:
    collection_id: str
    dimension: int
    threshold: float
    key_version: int
    min_key_version: int
    mac: bytes


@dataclass(frozen=True)
class CollectionKeyRow:
    collection_id: str
    key_version: int
    he_params: str
    public_context: bytes
    sealed_secret_context: bytes


@dataclass(frozen=True)
class TemplateRow:
    template_id: str
    collection_id: str
    subject_hmac: bytes
    key_version: int
    block_no: int
    slot: int
    request_hmac: bytes | None
    state: int
    mac: bytes

    def __repr__(self) -> str:
        return f"TemplateRow(template_id={self.template_id!r}, block_no={self.block_no}, slot={self.slot})"


@dataclass(frozen=True)
class BlockRow:
    collection_id: str
    key_version: int
    block_no: int
    generation: int
    used: int
    digest: bytes
    mac: bytes


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


class Store:
    """One SQLite connection behind a lock (the embedded default serves from one process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                       (SCHEMA_VERSION,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locking) transaction; rolled back on any exception.

        Storage failures become :class:`ResourceExhausted` (disk full) or
        :class:`Unavailable` (I/O error, locked, read-only): either way nothing was written.
        """
        with self._lock, _storage_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back by itself already
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock, _storage_errors():
            return self._db.execute(sql, args).fetchall()

    # -- meta and wrapped keys ------------------------------------------------------------

    def has_wrapped_keys(self) -> bool:
        """True once a key ceremony has wrapped anything into this database."""
        return bool(self._query("SELECT 1 FROM wrapped_keys LIMIT 1"))

    def wrapped_key(self, name: str, version: int) -> bytes | None:
        rows = self._query("SELECT blob FROM wrapped_keys WHERE name=? AND version=?", (name, version))
        return rows[0][0] if rows else None

    def put_wrapped_key(self, name: str, version: int, blob: bytes) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO wrapped_keys(name, version, blob, created_at) VALUES (?,?,?,?)",
                       (name, version, blob, time.time()))

    # -- collections ---------------------------------------------------------------------

    def collection(self, collection_id: str) -> CollectionRow | None:
        rows = self._query(
            "SELECT collection_id, dimension, threshold, key_version, min_key_version, mac "
            "FROM collections WHERE collection_id=?", (collection_id,))
        return CollectionRow(*rows[0]) if rows else None

    def collections(self) -> list[CollectionRow]:
        return [CollectionRow(*r) for r in self._query(
            "SELECT collection_id, dimension, threshold, key_version, min_key_version, mac "
            "FROM collections ORDER BY collection_id")]

    def insert_collection(self, row: CollectionRow, key: CollectionKeyRow) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO collections VALUES (?,?,?,?,?,?,?)",
                       (row.collection_id, row.dimension, row.threshold, row.key_version,
                        row.min_key_version, time.time(), row.mac))
            db.execute("INSERT INTO collection_keys VALUES (?,?,?,?,?,?)",
                       (key.collection_id, key.key_version, key.he_params, key.public_context,
                        key.sealed_secret_context, time.time()))

    def collection_key(self, collection_id: str, key_version: int) -> CollectionKeyRow | None:
        rows = self._query(
            "SELECT collection_id, key_version, he_params, public_context, sealed_secret_context "
            "FROM collection_keys WHERE collection_id=? AND key_version=?", (collection_id, key_version))
        return CollectionKeyRow(*rows[0]) if rows else None

    # -- subjects ------------------------------------------------------------------------

    def sealed_subject_id(self, collection_id: str, subject_hmac: bytes) -> bytes | None:
        rows = self._query("SELECT sealed_subject_id FROM subjects WHERE collection_id=? AND subject_hmac=?",
                           (collection_id, subject_hmac))
        return rows[0][0] if rows else None

    # -- templates -----------------------------------------------------------------------

    _TEMPLATE_COLUMNS = ("template_id, collection_id, subject_hmac, key_version, block_no, slot, "
                         "request_hmac, state, mac")

    def template_by_request(self, request_hmac: bytes) -> TemplateRow | None:
        rows = self._query(f"SELECT {self._TEMPLATE_COLUMNS} FROM templates WHERE request_hmac=?",
                           (request_hmac,))
        return TemplateRow(*rows[0]) if rows else None

    def subject_templates(self, collection_id: str, subject_hmac: bytes) -> list[TemplateRow]:
        return [TemplateRow(*r) for r in self._query(
            f"SELECT {self._TEMPLATE_COLUMNS} FROM templates WHERE collection_id=? AND subject_hmac=? "
            "AND state=? ORDER BY template_id", (collection_id, subject_hmac, LIVE))]

    def live_templates(self, collection_id: str, key_version: int) -> list[TemplateRow]:
        return [TemplateRow(*r) for r in self._query(
            f"SELECT {self._TEMPLATE_COLUMNS} FROM templates WHERE collection_id=? AND key_version=? "
            "AND state=?", (collection_id, key_version, LIVE))]

    def count_live(self, collection_id: str) -> int:
        return self._query("SELECT COUNT(*) FROM templates WHERE collection_id=? AND state=?",
                           (collection_id, LIVE))[0][0]

    def write_enrollment(self, blocks: list[tuple[BlockRow, list[bytes]]],
                         templates: list[TemplateRow],
                         subjects: list[tuple[str, bytes, bytes]]) -> None:
        """One transaction: new block states, their ciphertexts, template and subject rows."""
        now = time.time()
        with self.transaction() as db:
            for head, cts in blocks:
                db.execute(
                    "INSERT OR REPLACE INTO blocks VALUES (?,?,?,?,?,?,?)",
                    (head.collection_id, head.key_version, head.block_no, head.generation,
                     head.used, head.digest, head.mac))
                db.executemany(
                    "INSERT OR REPLACE INTO block_ciphertexts VALUES (?,?,?,?,?)",
                    [(head.collection_id, head.key_version, head.block_no, dim, ct)
                     for dim, ct in enumerate(cts)])
            db.executemany(
                "INSERT OR IGNORE INTO subjects VALUES (?,?,?)", subjects)
            db.executemany(
                "INSERT INTO templates VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(t.template_id, t.collection_id, t.subject_hmac, t.key_version, t.block_no,
                  t.slot, t.request_hmac, t.state, now, t.mac) for t in templates])

    def mark_deleted(self, collection_id: str, subject_hmac: bytes,
                     macs: dict[str, bytes]) -> None:
        """Tombstone the given templates (with their new MACs) and forget the subject id."""
        with self.transaction() as db:
            db.executemany("UPDATE templates SET state=?, mac=? WHERE template_id=? AND state=?",
                           [(DELETED, mac, tid, LIVE) for tid, mac in macs.items()])
            db.execute("DELETE FROM subjects WHERE collection_id=? AND subject_hmac=?",
                       (collection_id, subject_hmac))
            db.execute("DELETE FROM verify_attempts WHERE collection_id=? AND subject_hmac=?",
                       (collection_id, subject_hmac))

    # -- failed verification attempts ----------------------------------------------------

    def verify_attempts(self, collection_id: str, subject_hmac: bytes) -> tuple[int, float]:
        """(consecutive failures, locked until epoch seconds) of one subject."""
        rows = self._query("SELECT failures, locked_until FROM verify_attempts "
                           "WHERE collection_id=? AND subject_hmac=?", (collection_id, subject_hmac))
        return (rows[0][0], rows[0][1]) if rows else (0, 0.0)

    def set_verify_attempts(self, collection_id: str, subject_hmac: bytes, failures: int,
                            locked_until: float) -> None:
        with self.transaction() as db:
            if failures == 0 and locked_until == 0.0:
                db.execute("DELETE FROM verify_attempts WHERE collection_id=? AND subject_hmac=?",
                           (collection_id, subject_hmac))
            else:
                db.execute("INSERT OR REPLACE INTO verify_attempts VALUES (?,?,?,?)",
                           (collection_id, subject_hmac, failures, locked_until))

    # -- blocks --------------------------------------------------------------------------

    def blocks(self, collection_id: str, key_version: int) -> list[BlockRow]:
        return [BlockRow(*r) for r in self._query(
            "SELECT collection_id, key_version, block_no, generation, used, digest, mac FROM blocks "
            "WHERE collection_id=? AND key_version=? ORDER BY block_no", (collection_id, key_version))]

    def block_ciphertexts(self, collection_id: str, key_version: int, block_no: int) -> list[bytes]:
        return [r[0] for r in self._query(
            "SELECT ciphertext FROM block_ciphertexts WHERE collection_id=? AND key_version=? "
            "AND block_no=? ORDER BY dim", (collection_id, key_version, block_no))]
