"""Append-only audit log: hash-chained entries, checkpoints signed by an Ed25519 key in the HSM.

Every admitted RPC leaves two entries: ``request`` before anything runs and ``response``
with the outcome (the status, and for matches the decision). Entries hold who (the
credential), what (method, collection, subjects only as unlinkable references, see
below), when, the outcome and details (``detail``, JSON: for matches the threshold used,
1:1 or 1:N, the purpose, whether scores were released); never scores, embeddings or
subject ids. It fails closed: when the request entry cannot be written the request is
refused before it runs, and when the response entry cannot be written the answer is
withheld.

Subject references (column ``subject_hmacs``) are per entry: an HMAC of the entry's
``ref`` under a key derived from the subject's sealed record
(:meth:`vault.service.Vault.audit_subject_ref`). Two entries of one subject look
unrelated; with the vault's keys and the subject's live record an investigator can test
whether an entry names that subject; once the subject is deleted, nobody can.

Calls refused before they run (no credential, wrong role, rate limit, budget, probing
guard) cost no fsync and no HSM call each: they are counted in memory and written as one
``refused`` entry per ``REFUSED_INTERVAL`` seconds (and at close) with the counts per
(credential, method, collection, status).

Each entry's hash covers the previous hash, so editing, inserting or deleting an entry
breaks the chain from there on. Every ``CHECKPOINT_EVERY`` entries (and at close) the
current (sequence number, hash) is signed in the token: rewriting the chain needs the
token. Entries after the last checkpoint are chained but unsigned; ``verify`` reports how
many, since truncating them is the one change a signature cannot reveal.

The log is its own SQLite file (``audit.db``), so that it can be shipped and kept apart
from the templates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vault import logs
from vault.domain.errors import Unavailable, VaultError
from vault.keys.integrity import encode
from vault.keys.roles import Signer

log = logs.get("vault.audit")

CHECKPOINT_EVERY = 64
# Seconds between ``refused`` entries (env VAULT_AUDIT_REFUSED_INTERVAL; tests use 0).
REFUSED_INTERVAL = float(os.environ.get("VAULT_AUDIT_REFUSED_INTERVAL", "10"))
REFUSED_KEYS = 1000
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
  hash BLOB NOT NULL,
  detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS checkpoints (
  seq INTEGER PRIMARY KEY,
  hash BLOB NOT NULL,
  ts REAL NOT NULL,
  signature BLOB NOT NULL
);
"""
_COLUMNS = "seq, ts, kind, ref, actor, method, collection_id, subject_hmacs, outcome, detail, hash"


@dataclass(frozen=True)
class Entry:
    seq: int
    ts: float
    kind: str
    ref: str
    actor: str
    method: str
    collection_id: str
    subject_hmacs: str  # comma-separated hex per-entry subject references, never ids
    outcome: str
    detail: str = ""
    hash: bytes = field(repr=False, default=b"")

    def digest(self, prev: bytes) -> bytes:
        fields = (self.seq, repr(self.ts), self.kind, self.ref, self.actor, self.method,
                  self.collection_id, self.subject_hmacs, self.outcome)
        # Entries written before details existed keep their hashes.
        body = encode("audit-entry", *fields, *((self.detail,) if self.detail else ()))
        return hashlib.sha256(prev + body).digest()


def _checkpoint_message(seq: int, entry_hash: bytes) -> bytes:
    return encode("audit-checkpoint", seq, entry_hash)


class AuditUnavailable(Unavailable):
    """The audit record could not be written: the request is refused."""


class AuditLog:
    """The writer. One connection, one lock: entries are strictly sequential."""

    def __init__(self, path: Path, hsm: Signer, checkpoint_every: int = CHECKPOINT_EVERY) -> None:
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
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(entries)")}
        if "detail" not in columns:  # a log from before details
            self._db.execute("ALTER TABLE entries ADD COLUMN detail TEXT NOT NULL DEFAULT ''")
        hsm.ensure_audit_key()
        self._refused: Counter[tuple[str, str, str, str]] = Counter()
        self._refused_since = time.monotonic()
        row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        self._seq: int = row[0] if row else 0
        self._head: bytes = bytes(row[1]) if row else GENESIS
        self.signed_seq = self._db.execute("SELECT MAX(seq) FROM checkpoints").fetchone()[0] or 0
        self._unsigned = self._seq - self.signed_seq
        # Called with each new checkpoint's seq, after its row is durable (vault.custody
        # keeps it in the token to detect a restored older directory).
        self.on_checkpoint: Callable[[int], object] | None = None

    def append(self, kind: str, ref: str, actor: str, method: str, collection_id: str = "",
               subject_hmacs: list[bytes] | tuple[bytes, ...] = (), outcome: str = "",
               detail: str = "") -> int:
        """Write one entry durably; raise :class:`AuditUnavailable` if that is impossible."""
        with self._lock:
            if self._refused and time.monotonic() - self._refused_since >= REFUSED_INTERVAL:
                self._flush_refused()
            return self._append(Entry(self._seq + 1, time.time(), kind, ref, actor, method,
                                      collection_id, ",".join(h.hex() for h in subject_hmacs if h),
                                      outcome, detail))

    def refused(self, actor: str, method: str, collection_id: str, code: str) -> None:
        """Count a call refused before it ran; written in the next ``refused`` entry."""
        with self._lock:
            key = (actor, method, collection_id, code)
            if key not in self._refused and len(self._refused) >= REFUSED_KEYS:
                key = ("<other>", method, "", code)  # bounded memory under a flood of names
            self._refused[key] += 1
            if time.monotonic() - self._refused_since >= REFUSED_INTERVAL:
                try:
                    self._flush_refused()
                except AuditUnavailable:
                    pass  # kept in memory; the next flush writes them

    def _flush_refused(self) -> None:
        counts = [{"actor": a, "method": m, "collection_id": c, "code": k, "count": n}
                  for (a, m, c, k), n in sorted(self._refused.items())]
        self._append(Entry(self._seq + 1, time.time(), "refused", secrets.token_hex(8), "vault",
                           "refused", "", "", f"refused={sum(self._refused.values())}",
                           json.dumps(counts, sort_keys=True)))
        self._refused.clear()
        self._refused_since = time.monotonic()

    def _append(self, entry: Entry) -> int:
        """Write ``entry`` (the caller holds the lock)."""
        entry_hash = entry.digest(self._head)
        try:
            self._db.execute(f"INSERT INTO entries({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                             (entry.seq, entry.ts, entry.kind, entry.ref, entry.actor,
                              entry.method, entry.collection_id, entry.subject_hmacs,
                              entry.outcome, entry.detail, entry_hash))
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
            if self._refused:
                try:
                    self._flush_refused()
                except AuditUnavailable:
                    pass
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
            entry = dataclasses.replace(Entry(*row[:10]), hash=bytes(row[10]))
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


@dataclass(frozen=True)
class Search:
    """One 1:N identification as the audit log records it."""

    when: str
    actor: str
    purpose: str
    outcome: str
    threshold: float | None
    named: int  # subjects the answer named


def searches(path: Path, collection_id: str, purpose: str | None = None
             ) -> tuple[list[Search], dict[tuple[str, str], dict[str, int]]]:
    """The 1:N searches of a collection (response entries, oldest first), and their
    outcome counts per (credential, purpose). Run ``verify`` to trust them."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT ts, actor, outcome, detail FROM entries WHERE kind='response' "
                          "AND method='Match' AND collection_id=? ORDER BY seq",
                          (collection_id,)).fetchall()
    finally:
        db.close()
    found: list[Search] = []
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for ts, actor, outcome, detail in rows:
        info = json.loads(detail) if detail else {}
        if info.get("mode") != "1:N":
            continue
        why = info.get("purpose", "")
        if purpose is not None and why != purpose:
            continue
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
        found.append(Search(when, actor, why, outcome, info.get("threshold"),
                            int(info.get("candidates", 0))))
        by_outcome = counts.setdefault((actor, why), {})
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
    return found, counts
