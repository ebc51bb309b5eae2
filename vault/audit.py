"""Append-only audit log: hash-chained entries, checkpoints signed by an Ed25519 key in the HSM.

Every RPC leaves two entries: ``request`` before anything runs and ``response`` with the
outcome (the status, and for matches the decision). Entries hold who (the peer), what
(method, collection, subject ids only as their HMAC), when and the outcome; never scores,
embeddings or subject ids. It fails closed: when the request entry cannot be written the
request is refused before it runs, and when the response entry cannot be written the
answer is withheld.

Each entry's hash covers the previous hash, so editing, inserting or deleting an entry
breaks the chain from there on. Every ``CHECKPOINT_EVERY`` entries (and at close) the
current (sequence number, hash) is signed in the token: rewriting the chain needs the
token. Entries after the last checkpoint are chained but unsigned; ``verify`` reports how
many, since truncating them is the one change a signature cannot reveal.

The log is its own SQLite file (``audit.db``), so that it can be shipped and kept apart
from the templates.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vault import logs
from vault.errors import Unavailable, VaultError
from vault.keys.hsm import Hsm
from vault.keys.integrity import encode

log = logs.get("vault.audit")

CHECKPOINT_EVERY = 64
GENESIS = b"\x00" * 32

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
  seq INTEGER PRIMARY KEY,
  ts REAL NOT NULL,
  kind TEXT NOT NULL,
  ref TEXT NOT NULL,
  actor TEXT NOT NULL,
  method TEXT NOT NULL,
  collection_id TEXT NOT NULL,
  subject_hmacs TEXT NOT NULL,
  outcome TEXT NOT NULL,
  hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
  seq INTEGER PRIMARY KEY,
  hash BLOB NOT NULL,
  ts REAL NOT NULL,
  signature BLOB NOT NULL
);
"""
_COLUMNS = "seq, ts, kind, ref, actor, method, collection_id, subject_hmacs, outcome, hash"


@dataclass(frozen=True)
class Entry:
    seq: int
    ts: float
    kind: str
    ref: str
    actor: str
    method: str
    collection_id: str
    subject_hmacs: str  # comma-separated hex HMACs (blind index), never ids
    outcome: str
    hash: bytes = field(repr=False, default=b"")

    def digest(self, prev: bytes) -> bytes:
        body = encode("audit-entry", self.seq, repr(self.ts), self.kind, self.ref, self.actor,
                      self.method, self.collection_id, self.subject_hmacs, self.outcome)
        return hashlib.sha256(prev + body).digest()


def _checkpoint_message(seq: int, entry_hash: bytes) -> bytes:
    return encode("audit-checkpoint", seq, entry_hash)


class AuditUnavailable(Unavailable):
    """The audit record could not be written: the request is refused."""


class AuditLog:
    """The writer. One connection, one lock: entries are strictly sequential."""

    def __init__(self, path: Path, hsm: Hsm, checkpoint_every: int = CHECKPOINT_EVERY) -> None:
        self.path = path
        self._hsm = hsm
        self._every = checkpoint_every
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)
        hsm.ensure_audit_key()
        row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        self._seq, self._head = (row[0], bytes(row[1])) if row else (0, GENESIS)
        self.signed_seq = self._db.execute("SELECT MAX(seq) FROM checkpoints").fetchone()[0] or 0
        self._unsigned = self._seq - self.signed_seq
        # Called with each new checkpoint's seq, after its row is durable (vault.custody
        # keeps it in the token to detect a restored older directory).
        self.on_checkpoint: Callable[[int], None] | None = None

    def append(self, kind: str, ref: str, actor: str, method: str, collection_id: str = "",
               subject_hmacs: list[bytes] | tuple[bytes, ...] = (), outcome: str = "") -> int:
        """Write one entry durably; raise :class:`AuditUnavailable` if that is impossible."""
        with self._lock:
            entry = Entry(self._seq + 1, time.time(), kind, ref, actor, method, collection_id,
                          ",".join(h.hex() for h in subject_hmacs), outcome)
            entry_hash = entry.digest(self._head)
            try:
                self._db.execute(f"INSERT INTO entries({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                                 (entry.seq, entry.ts, entry.kind, entry.ref, entry.actor,
                                  entry.method, entry.collection_id, entry.subject_hmacs,
                                  entry.outcome, entry_hash))
            except sqlite3.Error as exc:
                log.error("audit write failed", error_type=type(exc).__name__)
                raise AuditUnavailable("audit log unavailable (storage full or unwritable): "
                                       "the request was refused") from exc
            self._seq, self._head = entry.seq, entry_hash
            self._unsigned += 1
            if self._unsigned >= self._every:
                self._checkpoint()
            return entry.seq

    def _checkpoint(self) -> None:
        """Sign the head. A failure (token out) leaves the tail unsigned until the next try."""
        try:
            signature = self._hsm.audit_sign(_checkpoint_message(self._seq, self._head))
            self._db.execute("INSERT INTO checkpoints(seq, hash, ts, signature) VALUES (?,?,?,?)",
                             (self._seq, self._head, time.time(), signature))
        except (VaultError, sqlite3.Error) as exc:
            log.warning("audit checkpoint deferred", error_type=type(exc).__name__)
            return
        self._unsigned, self.signed_seq = 0, self._seq
        if self.on_checkpoint is not None:
            try:
                self.on_checkpoint(self._seq)
            except VaultError as exc:  # the token lags: a later checkpoint catches it up
                log.warning("rollback counter not advanced", error_type=type(exc).__name__)

    def close(self) -> None:
        """Sign what is unsigned, then close."""
        with self._lock:
            if self._unsigned:
                self._checkpoint()
            self._db.close()


@dataclass
class Report:
    entries: int = 0
    checkpoints: int = 0
    last_signed_seq: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned_tail(self) -> int:
        return self.entries - self.last_signed_seq


def verify(path: Path, public_key: bytes) -> Report:
    """Check the chain and every checkpoint signature; name the first bad entry."""
    report = Report()
    if not path.exists():
        report.problems.append(f"no audit log at {path}")
        return report
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
        checkpoints = {seq: (bytes(h), bytes(sig)) for seq, h, sig in
                       db.execute("SELECT seq, hash, signature FROM checkpoints ORDER BY seq")}
        report.checkpoints = len(checkpoints)
        head, expected = GENESIS, 1
        hashes: dict[int, bytes] = {}
        for row in db.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY seq"):
            entry = Entry(*row[:9], hash=bytes(row[9]))
            if entry.seq != expected:
                report.problems.append(f"entry {expected}: missing (next entry is {entry.seq})")
                break
            if entry.digest(head) != entry.hash:
                report.problems.append(f"entry {entry.seq}: hash chain broken (edited or replaced)")
                break
            head, expected = entry.hash, expected + 1
            hashes[entry.seq] = entry.hash
            report.entries = entry.seq
        for seq, (entry_hash, signature) in checkpoints.items():
            if seq > report.entries and not report.problems:
                report.problems.append(f"checkpoint {seq}: signs entries that are gone (truncated log)")
                break
            if seq not in hashes:
                continue  # beyond a break already reported
            try:
                key.verify(signature, _checkpoint_message(seq, entry_hash))
            except InvalidSignature:
                report.problems.append(f"checkpoint {seq}: bad signature")
                break
            if hashes[seq] != entry_hash:
                report.problems.append(f"entry {seq}: differs from its signed checkpoint")
                break
            report.last_signed_seq = seq
    except sqlite3.Error as exc:
        report.problems.append(f"audit log unreadable: {type(exc).__name__}")
    finally:
        db.close()
    return report
