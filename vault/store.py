"""Store role, part 1: the SQLite file with metadata, journal pages, wrapped keys.

WAL journal with ``synchronous=FULL`` (an acknowledged write survives power loss) and
``secure_delete`` (freed pages are zeroed, so overwritten ciphertexts and deleted rows do
not linger in the file). Every multi-row change is one transaction: a crash leaves either
the old or the new state, never half of an enrollment. Block ciphertexts live in files
(:mod:`vault.block_files`), named by the block rows here.

What is stored, and in what form:

- subject ids: AES-GCM under a data key wrapped by the HSM, found by an HMAC blind index;
- request ids: only their HMAC;
- templates: no values at all, only where their encrypted values sit (tier, page or
  block, slot) and whether they were erased from the ciphertexts;
- journal pages: CKKS ciphertexts under the collection's public key;
- block sketches (pre-filter centroids): AES-GCM under a data key wrapped by the HSM;
- CKKS secret contexts and data keys: wrapped by the HSM key-encryption key;
- a MAC keyed in the HSM on every collection, template, page and block row;
- per (collection, key version), a commitment to the live set (``collection_state``:
  a counter and an order-independent digest of the live template, page and block rows,
  MACed in the HSM), updated inside every transaction that changes those rows, so that a
  row deleted, restored or replayed behind the vault's back is found at load;
- no timestamps: nothing the engine does needs to know when a row was written.

A deleted template's row (tombstone) keeps only its place, and goes once its values are
erased from the ciphertexts; the subject's sealed id goes at once.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vault.errors import DataLoss, ResourceExhausted, Unavailable
from vault.keys.integrity import LiveSet

SCHEMA_VERSION = 4

_SCHEMA = """
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
  policy TEXT NOT NULL DEFAULT ''
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

# The store-wide epoch's row in collection_state: no collection has an empty id.
EPOCH_ROW = ("", 0)
# The key version of a collection's attempt-set commitment in collection_state: its
# verify_attempts rows, so that deleting one (a lock lifted) is detected like a template.
ATTEMPT_SET = -1
LIVE = 1
DELETED = 2
# Where a template's encrypted values sit: a journal page (template-major, written by
# single enrollments) or a block (dimension-major, written by imports and checkpoints).
PAGE = 0
BLOCK = 1
# Blocks: CLUSTERED ones come from an import chunk's balanced clustering and carry a
# sketch (centroid) for the pre-filter; MIXED ones are filled in arrival order.
CLUSTERED = 1
MIXED = 2


@dataclass(frozen=True)
class CollectionRow:
    collection_id: str
    dimension: int
    threshold: float
    key_version: int
    min_key_version: int
    mac: bytes
    # The embedding model's public population mean (float64 bytes), or None: see
    # vault.protector (wolves).
    reference_mean: bytes | None = None
    # Release settings (vault.service.CollectionPolicy as JSON; '' = defaults), under the MAC.
    policy: str = ""


@dataclass(frozen=True)
class AttemptRow:
    """Verification attempts of one subject by one credential (vault.attempts)."""

    collection_id: str
    subject_hmac: bytes
    credential_hmac: bytes
    failures: int  # reservations in flight included
    since: float  # first failure of the current run
    locked_until: float
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
    tier: int
    loc: int
    slot: int
    request_hmac: bytes | None
    state: int
    erased: int
    mac: bytes

    def __repr__(self) -> str:
        return (f"TemplateRow(template_id={self.template_id!r}, tier={self.tier}, "
                f"loc={self.loc}, slot={self.slot})")


@dataclass(frozen=True)
class PageRow:
    collection_id: str
    key_version: int
    page_no: int
    generation: int
    fill: int
    ciphertext: bytes
    mac: bytes

    def __repr__(self) -> str:
        return f"PageRow(page_no={self.page_no}, generation={self.generation}, fill={self.fill})"


@dataclass(frozen=True)
class BlockRow:
    collection_id: str
    key_version: int
    block_no: int
    kind: int
    generation: int
    levels: int
    fill: int
    digest: bytes
    sketch: bytes | None
    mac: bytes

    def __repr__(self) -> str:
        return f"BlockRow(block_no={self.block_no}, generation={self.generation}, fill={self.fill})"


@dataclass(frozen=True)
class KeyJobRow:
    """A collection key rotation: state 'running', 'done' or 'failed'."""

    job_id: str
    collection_id: str
    from_version: int
    to_version: int
    state: str
    blocks_done: int
    blocks_total: int
    error: str | None


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
        # Set by the vault: keys the live-set commitment every write transaction updates.
        self.live_set: LiveSet | None = None
        self._delta: dict[tuple[str, int], int] = {}
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
            (found,) = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if int(found) != SCHEMA_VERSION:
            self._db.close()
            raise Unavailable(f"database schema version {int(found)} is not {SCHEMA_VERSION}: "
                              "this vault cannot open it")

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
            self._delta = {}
            try:
                yield self._db
                self._commit_states(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back by itself already
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise

    def checkpoint_wal(self) -> None:
        """Copy the WAL into the main file and truncate it to zero bytes: older page images
        (a deleted row, a replaced ciphertext) leave the WAL, and the pages they were
        freed from are zeroed in the main file (``secure_delete``)."""
        with self._lock, _storage_errors():
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise Unavailable("the database was busy: its write-ahead log was not truncated")

    # -- live-set commitments -------------------------------------------------------------

    def _change(self, collection_id: str, key_version: int, delta: int) -> None:
        key = (collection_id, key_version)
        self._delta[key] = self._delta.get(key, 0) + delta

    def _template_leaf(self, row: tuple) -> int:
        """``row``: (template_id, collection_id, subject_hmac, key_version, tier, loc,
        slot, mac) of a live template."""
        assert self.live_set is not None
        tid, cid, subject_hmac, version, tier, loc, slot, mac = row
        return self.live_set.template(cid, version, tid, subject_hmac, tier, loc, slot, mac)

    _LEAF_COLUMNS = "template_id, collection_id, subject_hmac, key_version, tier, loc, slot, mac"

    def _forget_template(self, db: sqlite3.Connection, template_id: str, key_version: int) -> None:
        """Take a stored template row out of its commitment, if it is live (before it is
        updated, replaced or deleted)."""
        found = db.execute(f"SELECT {self._LEAF_COLUMNS} FROM templates WHERE template_id=? "
                           "AND key_version=? AND state=?", (template_id, key_version, LIVE)).fetchone()
        if found is not None:
            self._change(found[1], found[3], -self._template_leaf(found))

    def _add_template(self, t: TemplateRow) -> None:
        if t.state == LIVE:
            self._change(t.collection_id, t.key_version, self._template_leaf(
                (t.template_id, t.collection_id, t.subject_hmac, t.key_version, t.tier, t.loc,
                 t.slot, t.mac)))

    def _holder_leaf(self, cid: str, version: int, tier: int, loc: int, generation: int,
                     mac: bytes) -> int:
        assert self.live_set is not None
        return self.live_set.holder(cid, version, tier, loc, generation, mac)

    def _forget_holder(self, db: sqlite3.Connection, tier: int, cid: str, version: int,
                       loc: int) -> None:
        table, column = ("pages", "page_no") if tier == PAGE else ("blocks", "block_no")
        found = db.execute(f"SELECT generation, mac FROM {table} WHERE collection_id=? AND "
                           f"key_version=? AND {column}=?", (cid, version, loc)).fetchone()
        if found is not None:
            self._change(cid, version, -self._holder_leaf(cid, version, tier, loc, *found))

    def _new_state(self, db: sqlite3.Connection, collection_id: str, key_version: int) -> None:
        assert self.live_set is not None
        digest = bytes(32)
        db.execute("INSERT INTO collection_state VALUES (?,?,?,?,?)",
                   (collection_id, key_version, 0, digest,
                    self.live_set.seal(collection_id, key_version, 0, digest)))

    def _commit_states(self, db: sqlite3.Connection) -> None:
        """Fold this transaction's changes into the state rows it touched (checked first:
        a state row changed behind the vault's back is not built upon), and count one more
        store epoch (:meth:`epoch`)."""
        delta, self._delta = self._delta, {}
        if delta:
            delta[EPOCH_ROW] = 0
        for (cid, version), change in delta.items():
            assert self.live_set is not None
            found = db.execute("SELECT counter, digest, mac FROM collection_state WHERE "
                               "collection_id=? AND key_version=?", (cid, version)).fetchone()
            if found is None and (cid, version) == EPOCH_ROW:
                self._new_state(db, cid, version)  # a first write (a deleted row restarts at 1:
                found = (0, bytes(32), None)       # below the token's count, see epoch())
            elif found is None or not self.live_set.check(found[2], cid, version, found[0], found[1]):
                raise DataLoss("the collection's live-set commitment is missing or failed its "
                               "integrity check; nothing was written")
            counter, digest = found[0] + 1, LiveSet.add(found[1], change)
            db.execute("UPDATE collection_state SET counter=?, digest=?, mac=? WHERE "
                       "collection_id=? AND key_version=?",
                       (counter, digest, self.live_set.seal(cid, version, counter, digest),
                        cid, version))

    def epoch(self, verify: bool = True) -> int:
        """How many write transactions changed a live set, ever: a MACed counter that only
        rises. The token keeps its value at each signed audit checkpoint
        (:mod:`vault.custody`), so a ``vault.db`` restored from an older copy, even beside the
        current audit log, is refused at start. ``verify=False``: without the MAC check (an
        admin accepting a restore, before the vault's keys are open)."""
        rows = self._query("SELECT counter, digest, mac FROM collection_state WHERE "
                           "collection_id=? AND key_version=?", EPOCH_ROW)
        if not rows:
            return 0
        counter, digest, mac = rows[0]
        if verify:
            assert self.live_set is not None
            if not self.live_set.check(mac, *EPOCH_ROW, counter, digest):
                raise DataLoss("the store's epoch counter failed its integrity check")
        return int(counter)

    def live_set_state(self, collection_id: str, key_version: int) -> tuple[int, bytes, bytes] | None:
        """(counter, digest, MAC) of a key version's commitment, if stored."""
        rows = self._query("SELECT counter, digest, mac FROM collection_state WHERE "
                           "collection_id=? AND key_version=?", (collection_id, key_version))
        return rows[0] if rows else None

    def live_set_digest(self, collection_id: str, key_version: int) -> bytes:
        """The commitment recomputed from every stored live template, page and block row."""
        args = (collection_id, key_version)
        total = sum(self._template_leaf(r) for r in self._query(
            f"SELECT {self._LEAF_COLUMNS} FROM templates WHERE collection_id=? AND key_version=? "
            "AND state=?", args + (LIVE,)))
        for tier, table, column in ((PAGE, "pages", "page_no"), (BLOCK, "blocks", "block_no")):
            total += sum(self._holder_leaf(collection_id, key_version, tier, loc, generation, mac)
                         for loc, generation, mac in self._query(
                             f"SELECT {column}, generation, mac FROM {table} WHERE collection_id=? "
                             "AND key_version=?", args))
        return LiveSet.add(bytes(32), total)

    def subjects_missing(self, collection_id: str, key_version: int) -> int:
        """Subjects with a live template but no sealed id row (a deleted subjects row)."""
        return self._query(
            "SELECT COUNT(DISTINCT t.subject_hmac) FROM templates t LEFT JOIN subjects s ON "
            "s.collection_id=t.collection_id AND s.subject_hmac=t.subject_hmac WHERE "
            "t.collection_id=? AND t.key_version=? AND t.state=? AND s.subject_hmac IS NULL",
            (collection_id, key_version, LIVE))[0][0]

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
            db.execute("INSERT INTO wrapped_keys(name, version, blob) VALUES (?,?,?)",
                       (name, version, blob))

    # -- collections ---------------------------------------------------------------------

    _COLLECTION_COLUMNS = ("collection_id, dimension, threshold, key_version, min_key_version, mac, "
                           "reference_mean, policy")

    def collection(self, collection_id: str) -> CollectionRow | None:
        rows = self._query(f"SELECT {self._COLLECTION_COLUMNS} FROM collections "
                           "WHERE collection_id=?", (collection_id,))
        return CollectionRow(*rows[0]) if rows else None

    def collections(self) -> list[CollectionRow]:
        return [CollectionRow(*r) for r in self._query(
            f"SELECT {self._COLLECTION_COLUMNS} FROM collections ORDER BY collection_id")]

    def insert_collection(self, row: CollectionRow, key: CollectionKeyRow) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO collections(collection_id, dimension, threshold, key_version, "
                       "min_key_version, mac, reference_mean, policy) VALUES (?,?,?,?,?,?,?,?)",
                       (row.collection_id, row.dimension, row.threshold, row.key_version,
                        row.min_key_version, row.mac, row.reference_mean, row.policy))
            self._put_collection_key(db, key)
            self._new_state(db, row.collection_id, ATTEMPT_SET)

    def _put_collection_key(self, db: sqlite3.Connection, key: CollectionKeyRow) -> None:
        """A key version, and its (empty) live-set commitment."""
        db.execute("INSERT INTO collection_keys VALUES (?,?,?,?,?)",
                   (key.collection_id, key.key_version, key.he_params, key.public_context,
                    key.sealed_secret_context))
        self._new_state(db, key.collection_id, key.key_version)

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

    _TEMPLATE_COLUMNS = ("template_id, collection_id, subject_hmac, key_version, tier, loc, slot, "
                         "request_hmac, state, erased, mac")

    def template_by_request(self, request_hmac: bytes) -> TemplateRow | None:
        """The newest key version's row of the template a request id made."""
        rows = self._query(f"SELECT {self._TEMPLATE_COLUMNS} FROM templates WHERE request_hmac=? "
                           "ORDER BY key_version DESC LIMIT 1", (request_hmac,))
        return TemplateRow(*rows[0]) if rows else None

    def existing_requests(self, request_hmacs: list[bytes]) -> set[bytes]:
        """Which of these request HMACs already name a template."""
        found: set[bytes] = set()
        for start in range(0, len(request_hmacs), 500):
            part = request_hmacs[start:start + 500]
            found.update(r[0] for r in self._query(
                f"SELECT request_hmac FROM templates WHERE request_hmac IN ({','.join('?' * len(part))})",
                tuple(part)))
        return found

    def subject_templates(self, collection_id: str, subject_hmac: bytes,
                          key_version: int | None = None) -> list[TemplateRow]:
        """The live template rows of a subject: of one key version, or of every version
        present (during a rotation a template has a row under each)."""
        version_clause = "" if key_version is None else " AND key_version=?"
        args = (collection_id, subject_hmac, LIVE) + (() if key_version is None else (key_version,))
        return [TemplateRow(*r) for r in self._query(
            f"SELECT {self._TEMPLATE_COLUMNS} FROM templates WHERE collection_id=? AND subject_hmac=? "
            f"AND state=?{version_clause} ORDER BY template_id, key_version", args)]

    def templates_in(self, collection_id: str, key_version: int, tier: int, loc: int) -> list[TemplateRow]:
        """Every template (live or deleted) of one page or block, by slot."""
        return [TemplateRow(*r) for r in self._query(
            f"SELECT {self._TEMPLATE_COLUMNS} FROM templates WHERE collection_id=? AND key_version=? "
            "AND tier=? AND loc=? ORDER BY slot", (collection_id, key_version, tier, loc))]

    def live_places(self, collection_id: str, key_version: int) -> list[tuple[bytes, int, int, int]]:
        """(subject HMAC, tier, loc, slot) of every live template: what a start-up loads.
        Plain tuples: a million rows should not become a million objects."""
        return self._query("SELECT subject_hmac, tier, loc, slot FROM templates "
                           "WHERE collection_id=? AND key_version=? AND state=?",
                           (collection_id, key_version, LIVE))

    def unerased(self, collection_id: str, key_version: int) -> list[tuple[int, int]]:
        """(tier, loc) of the pages and blocks still holding values of deleted templates
        (a tombstone row stays until its values are erased, then goes)."""
        return self._query("SELECT DISTINCT tier, loc FROM templates WHERE collection_id=? "
                           "AND key_version=? AND state=? AND erased=0",
                           (collection_id, key_version, DELETED))

    def max_loc(self, collection_id: str, key_version: int, tier: int) -> int:
        """The highest page or block number any row names (-1 if none): template rows and
        the page or block rows themselves, loadable or not. New numbers start above it, so a
        damaged holder's row (the evidence) and its templates are never overwritten."""
        table, column = ("pages", "page_no") if tier == PAGE else ("blocks", "block_no")
        found = self._query(
            "SELECT MAX(n) FROM (SELECT MAX(loc) AS n FROM templates WHERE collection_id=? "
            "AND key_version=? AND tier=? "
            f"UNION ALL SELECT MAX({column}) FROM {table} WHERE collection_id=? AND key_version=?)",
            (collection_id, key_version, tier, collection_id, key_version))[0][0]
        return -1 if found is None else int(found)

    def _insert_templates(self, db: sqlite3.Connection, templates: list[TemplateRow]) -> None:
        db.executemany(
            "INSERT INTO templates VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [(t.template_id, t.collection_id, t.subject_hmac, t.key_version, t.tier, t.loc,
              t.slot, t.request_hmac, t.state, t.erased, t.mac) for t in templates])
        for t in templates:
            self._add_template(t)

    def _update_templates(self, db: sqlite3.Connection, templates: list[TemplateRow]) -> None:
        for t in templates:
            self._forget_template(db, t.template_id, t.key_version)
            self._add_template(t)
        db.executemany(
            "UPDATE templates SET tier=?, loc=?, slot=?, state=?, erased=?, mac=? "
            "WHERE template_id=? AND key_version=?",
            [(t.tier, t.loc, t.slot, t.state, t.erased, t.mac, t.template_id, t.key_version)
             for t in templates])

    def _put_page(self, db: sqlite3.Connection, page: PageRow) -> None:
        self._forget_holder(db, PAGE, page.collection_id, page.key_version, page.page_no)
        db.execute("INSERT OR REPLACE INTO pages VALUES (?,?,?,?,?,?,?)",
                   (page.collection_id, page.key_version, page.page_no, page.generation,
                    page.fill, page.ciphertext, page.mac))
        self._change(page.collection_id, page.key_version, self._holder_leaf(
            page.collection_id, page.key_version, PAGE, page.page_no, page.generation, page.mac))

    def _put_block(self, db: sqlite3.Connection, block: BlockRow) -> None:
        self._forget_holder(db, BLOCK, block.collection_id, block.key_version, block.block_no)
        db.execute("INSERT OR REPLACE INTO blocks VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (block.collection_id, block.key_version, block.block_no, block.kind,
                    block.generation, block.levels, block.fill, block.digest, block.sketch,
                    block.mac))
        self._change(block.collection_id, block.key_version, self._holder_leaf(
            block.collection_id, block.key_version, BLOCK, block.block_no, block.generation,
            block.mac))

    def write_templates(self, pages: list[PageRow], blocks: list[BlockRow],
                        templates: list[TemplateRow],
                        subjects: list[tuple[str, bytes, bytes]]) -> None:
        """One transaction: new page and block states, new template and subject rows
        (an enrollment, or one chunk of an import)."""
        with self.transaction() as db:
            for page in pages:
                self._put_page(db, page)
            for block in blocks:
                self._put_block(db, block)
            db.executemany("INSERT OR IGNORE INTO subjects VALUES (?,?,?)", subjects)
            self._insert_templates(db, templates)

    def write_relocation(self, blocks: list[BlockRow], moved: list[TemplateRow],
                         dropped_pages: list[tuple[str, int, int]],
                         erased: list[tuple[str, int]]) -> None:
        """One transaction: new block states, templates moved (their new rows), tombstones
        whose values were erased (template id, key version: the rows go), journal pages
        dropped (a checkpoint, a compaction)."""
        with self.transaction() as db:
            for block in blocks:
                self._put_block(db, block)
            self._update_templates(db, moved)
            db.executemany("DELETE FROM templates WHERE template_id=? AND key_version=? AND state=?",
                           [(tid, version, DELETED) for tid, version in erased])
            for cid, version, page_no in dropped_pages:
                self._forget_holder(db, PAGE, cid, version, page_no)
            db.executemany("DELETE FROM pages WHERE collection_id=? AND key_version=? AND page_no=?",
                           dropped_pages)

    def mark_deleted(self, collection_id: str, subject_hmac: bytes,
                     templates: list[TemplateRow]) -> None:
        """Tombstone the given templates (rows with their new MACs: no subject HMAC, no
        request HMAC left), forget the subject id."""
        with self.transaction() as db:
            for t in templates:
                self._forget_template(db, t.template_id, t.key_version)
            db.executemany("UPDATE templates SET subject_hmac=?, request_hmac=?, state=?, mac=? "
                           "WHERE template_id=? AND key_version=? AND state=?",
                           [(t.subject_hmac, t.request_hmac, t.state, t.mac, t.template_id,
                             t.key_version, LIVE) for t in templates])
            db.execute("DELETE FROM subjects WHERE collection_id=? AND subject_hmac=?",
                       (collection_id, subject_hmac))
            self._delete_attempts(db, collection_id, subject_hmac)

    # -- verification attempts (vault.attempts) ------------------------------------------

    def _attempt_leaf(self, row: AttemptRow) -> int:
        assert self.live_set is not None
        return self.live_set.attempt(row.collection_id, row.subject_hmac, row.credential_hmac,
                                     row.mac)

    def _delete_attempts(self, db: sqlite3.Connection, collection_id: str, subject_hmac: bytes,
                         only: AttemptRow | None = None) -> None:
        """Delete a subject's attempt rows (``only``: that row as it was read), and take their
        leaves out of the collection's attempt set."""
        rows = [AttemptRow(*r) for r in db.execute(
            f"SELECT {self._ATTEMPT_COLUMNS} FROM verify_attempts "
            "WHERE collection_id=? AND subject_hmac=?", (collection_id, subject_hmac))]
        if only is not None:
            rows = [r for r in rows if r.credential_hmac == only.credential_hmac
                    and r.mac == only.mac]
        for r in rows:
            db.execute("DELETE FROM verify_attempts WHERE collection_id=? AND subject_hmac=? "
                       "AND credential_hmac=?", (r.collection_id, r.subject_hmac, r.credential_hmac))
            self._change(collection_id, ATTEMPT_SET, -self._attempt_leaf(r))

    def reseal_attempt_set(self, collection_id: str) -> None:
        """Commit the collection's attempt set to the rows stored now (an administrator's
        unlock, which accepts what a writer may have changed)."""
        assert self.live_set is not None
        with self.transaction() as db:
            total = sum(self._attempt_leaf(AttemptRow(*r)) for r in db.execute(
                f"SELECT {self._ATTEMPT_COLUMNS} FROM verify_attempts WHERE collection_id=?",
                (collection_id,)))
            found = db.execute("SELECT counter FROM collection_state WHERE collection_id=? AND "
                               "key_version=?", (collection_id, ATTEMPT_SET)).fetchone()
            counter, digest = (found[0] if found else 0) + 1, LiveSet.add(bytes(32), total)
            db.execute("INSERT OR REPLACE INTO collection_state VALUES (?,?,?,?,?)",
                       (collection_id, ATTEMPT_SET, counter, digest,
                        self.live_set.seal(collection_id, ATTEMPT_SET, counter, digest)))

    def attempt_set_intact(self, collection_id: str) -> bool:
        """True when the collection's attempt rows sum to their MACed commitment: no row was
        deleted, restored or added behind the vault's back (a lock lifted by deleting it)."""
        assert self.live_set is not None
        state = self.live_set_state(collection_id, ATTEMPT_SET)
        if state is None or not self.live_set.check(state[2], collection_id, ATTEMPT_SET,
                                                    state[0], state[1]):
            return False
        total = sum(self._attempt_leaf(AttemptRow(*r)) for r in self._query(
            f"SELECT {self._ATTEMPT_COLUMNS} FROM verify_attempts WHERE collection_id=?",
            (collection_id,)))
        return LiveSet.add(bytes(32), total) == bytes(state[1])

    _ATTEMPT_COLUMNS = ("collection_id, subject_hmac, credential_hmac, failures, since, "
                        "locked_until, mac")

    def attempt_rows(self, collection_id: str, subject_hmac: bytes) -> list[AttemptRow]:
        return [AttemptRow(*r) for r in self._query(
            f"SELECT {self._ATTEMPT_COLUMNS} FROM verify_attempts "
            "WHERE collection_id=? AND subject_hmac=?", (collection_id, subject_hmac))]

    def update_attempts(self, collection_id: str, subject_hmac: bytes,
                        change: Callable[[list[AttemptRow]], AttemptRow | None]) -> None:
        """Read a subject's attempt rows and write the row ``change`` returns, in one
        transaction (an exception from ``change`` writes nothing)."""
        with self.transaction() as db:
            rows = [AttemptRow(*r) for r in db.execute(
                f"SELECT {self._ATTEMPT_COLUMNS} FROM verify_attempts "
                "WHERE collection_id=? AND subject_hmac=?", (collection_id, subject_hmac))]
            row = change(rows)
            if row is not None:
                for previous in rows:
                    if previous.credential_hmac == row.credential_hmac:
                        self._change(collection_id, ATTEMPT_SET, -self._attempt_leaf(previous))
                db.execute(f"INSERT OR REPLACE INTO verify_attempts({self._ATTEMPT_COLUMNS}) "
                           "VALUES (?,?,?,?,?,?,?)",
                           (row.collection_id, row.subject_hmac, row.credential_hmac,
                            row.failures, row.since, row.locked_until, row.mac))
                self._change(collection_id, ATTEMPT_SET, self._attempt_leaf(row))

    def expired_attempt_rows(self, now: float, window: float) -> list[AttemptRow]:
        """Rows neither locked nor holding failures still in their window."""
        return [AttemptRow(*r) for r in self._query(
            f"SELECT {self._ATTEMPT_COLUMNS} FROM verify_attempts "
            "WHERE locked_until <= ? AND since + ? <= ?", (now, window, now))]

    def delete_attempt_row(self, row: AttemptRow) -> None:
        """Delete one row as it was read (same MAC), nothing newer."""
        with self.transaction() as db:
            self._delete_attempts(db, row.collection_id, row.subject_hmac, only=row)

    def delete_attempt_rows(self, collection_id: str, subject_hmac: bytes) -> None:
        with self.transaction() as db:
            self._delete_attempts(db, collection_id, subject_hmac)

    # -- pages and blocks ----------------------------------------------------------------

    def pages(self, collection_id: str, key_version: int) -> list[PageRow]:
        return [PageRow(*r) for r in self._query(
            "SELECT collection_id, key_version, page_no, generation, fill, ciphertext, mac "
            "FROM pages WHERE collection_id=? AND key_version=? ORDER BY page_no",
            (collection_id, key_version))]

    _BLOCK_COLUMNS = ("collection_id, key_version, block_no, kind, generation, levels, fill, "
                      "digest, sketch, mac")

    def blocks(self, collection_id: str, key_version: int) -> list[BlockRow]:
        return [BlockRow(*r) for r in self._query(
            f"SELECT {self._BLOCK_COLUMNS} FROM blocks WHERE collection_id=? AND key_version=? "
            "ORDER BY block_no", (collection_id, key_version))]

    def block(self, collection_id: str, key_version: int, block_no: int) -> BlockRow | None:
        rows = self._query(
            f"SELECT {self._BLOCK_COLUMNS} FROM blocks WHERE collection_id=? AND key_version=? "
            "AND block_no=?", (collection_id, key_version, block_no))
        return BlockRow(*rows[0]) if rows else None

    # -- key jobs and key versions ----------------------------------------------------

    _JOB_COLUMNS = ("job_id, collection_id, from_version, to_version, state, blocks_done, "
                    "blocks_total, error")

    def insert_key_version(self, key: CollectionKeyRow, job: KeyJobRow) -> None:
        """A new key version of a collection, and the job that moves templates to it."""
        with self.transaction() as db:
            self._put_collection_key(db, key)
            db.execute(f"INSERT INTO key_jobs({self._JOB_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                       (job.job_id, job.collection_id, job.from_version, job.to_version, job.state,
                        job.blocks_done, job.blocks_total, job.error))

    def key_job(self, job_id: str) -> KeyJobRow | None:
        rows = self._query(f"SELECT {self._JOB_COLUMNS} FROM key_jobs WHERE job_id=?", (job_id,))
        return KeyJobRow(*rows[0]) if rows else None

    def key_jobs(self, state: str | None = None) -> list[KeyJobRow]:
        where, args = ("WHERE state=?", (state,)) if state else ("", ())
        return [KeyJobRow(*r) for r in self._query(
            f"SELECT {self._JOB_COLUMNS} FROM key_jobs {where} ORDER BY rowid", args)]

    def finish_job(self, job_id: str, state: str, error: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE key_jobs SET state=?, error=? WHERE job_id=?", (state, error, job_id))

    def write_moved_block(self, block: BlockRow, templates: list[TemplateRow], job_id: str,
                          done: int, total: int) -> None:
        """One transaction: a block moved to a new key version, its templates' rows under
        that version (replacing those of an earlier move of the same block), the job's
        progress."""
        with self.transaction() as db:
            self._put_block(db, block)
            earlier = db.execute("SELECT template_id FROM templates WHERE collection_id=? AND "
                                 "key_version=? AND tier=? AND loc=?",
                                 (block.collection_id, block.key_version, BLOCK,
                                  block.block_no)).fetchall()
            for (tid,) in earlier:
                self._forget_template(db, tid, block.key_version)
            db.executemany("DELETE FROM templates WHERE template_id=? AND key_version=?",
                           [(tid, block.key_version) for (tid,) in earlier])
            self._insert_templates(db, templates)
            db.execute("UPDATE key_jobs SET blocks_done=?, blocks_total=? WHERE job_id=?",
                       (done, total, job_id))

    def collection_key_versions(self, collection_id: str) -> list[int]:
        return [r[0] for r in self._query("SELECT key_version FROM collection_keys "
                                          "WHERE collection_id=? ORDER BY key_version",
                                          (collection_id,))]

    def switch_key_version(self, row: CollectionRow, old_version: int, job_id: str) -> None:
        """One transaction: the collection moves to its new key version (row with its new
        MAC); every row of the old version goes; the job is done."""
        cid = row.collection_id
        with self.transaction() as db:
            db.execute("UPDATE collections SET key_version=?, min_key_version=?, mac=? "
                       "WHERE collection_id=?", (row.key_version, row.min_key_version, row.mac, cid))
            for table in ("templates", "blocks", "pages", "collection_keys", "collection_state"):
                db.execute(f"DELETE FROM {table} WHERE collection_id=? AND key_version=?",
                           (cid, old_version))
            db.execute("UPDATE key_jobs SET state='done' WHERE job_id=?", (job_id,))

    def newest_key_version(self, collection_id: str) -> int:
        """The highest key version any row of the collection names."""
        return max((self._query(f"SELECT COALESCE(MAX(key_version), 0) FROM {t} "
                                "WHERE collection_id=?", (collection_id,))[0][0]
                    for t in ("collection_keys", "templates", "blocks", "pages")), default=0)

    def count_below(self, collection_id: str, key_version: int) -> int:
        """Rows of the collection under key versions below ``key_version``."""
        return sum(self._query(f"SELECT COUNT(*) FROM {t} WHERE collection_id=? AND key_version<?",
                               (collection_id, key_version))[0][0]
                   for t in ("collection_keys", "templates", "blocks", "pages"))

    def update_collection(self, row: CollectionRow) -> None:
        with self.transaction() as db:
            db.execute("UPDATE collections SET threshold=?, key_version=?, min_key_version=?, mac=?, "
                       "policy=? WHERE collection_id=?",
                       (row.threshold, row.key_version, row.min_key_version, row.mac, row.policy,
                        row.collection_id))

    # -- wrapped blobs (master key rotation) ----------------------------------------------

    def wrapped_blobs(self) -> list[tuple[str, tuple, bytes]]:
        """Every blob that names a KEK version: ('data-key', (name, version), blob) and
        ('ckks-secret', (collection, version, params), sealed secret context)."""
        out: list[tuple[str, tuple, bytes]] = [
            ("data-key", (name, version), blob) for name, version, blob in
            self._query("SELECT name, version, blob FROM wrapped_keys")]
        out += [("ckks-secret", (cid, version, params), blob) for cid, version, params, blob in
                self._query("SELECT collection_id, key_version, he_params, sealed_secret_context "
                            "FROM collection_keys")]
        return out

    def replace_wrapped_blobs(self, blobs: list[tuple[str, tuple, bytes]]) -> None:
        with self.transaction() as db:
            for kind, key, blob in blobs:
                if kind == "data-key":
                    db.execute("UPDATE wrapped_keys SET blob=? WHERE name=? AND version=?",
                               (blob, *key))
                else:
                    db.execute("UPDATE collection_keys SET sealed_secret_context=? "
                               "WHERE collection_id=? AND key_version=?", (blob, key[0], key[1]))

    def all_block_generations(self) -> list[tuple[str, int, int, int]]:
        """(collection, key version, block, generation) of every committed block."""
        return self._query("SELECT collection_id, key_version, block_no, generation FROM blocks")
