"""Verification attempts (vault.attempts): one MACed row per (subject, credential), and per
collection an attempt-set commitment in the live-set ledger, so that a row deleted or
restored behind the vault's back (a lock lifted) is found.

Checked in O(1) per reservation, like the live set is written: the store remembers, per
collection, the commitment it last verified or wrote and each subject's sum of leaves in
it. A reservation reads the state row and the subject's rows in one statement (one
snapshot); while the state row is the remembered one, the subject's rows must sum to the
remembered sum. Any other state (another writer, a restored row, a first look after a
start) costs one full check of the collection, MAC and sum, and is remembered from then.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vault.domain.records import AttemptRow
from vault.keys.integrity import LiveSet
from vault.storage.connection import upsert
from vault.storage.live_set import ATTEMPT_SET, LiveSetLedger

_STATE_UPSERT = upsert("collection_state", ("collection_id", "key_version", "counter", "digest",
                                            "mac"), ("collection_id", "key_version"))
_ATTEMPT_UPSERT = upsert("verify_attempts", ("collection_id", "subject_hmac", "credential_hmac",
                                             "failures", "since", "locked_until", "mac"),
                         ("collection_id", "subject_hmac", "credential_hmac"))

_MOD = 2 ** 256  # the commitment's digest is a sum mod 2^256 (vault.keys.integrity.LiveSet)


@dataclass
class _KnownSet:
    """A collection's attempt set as this store last verified or wrote it."""

    counter: int
    digest: bytes
    subjects: dict[bytes, int] = field(default_factory=dict)  # subject HMAC -> sum of leaves


class _KnownSets:
    """The remembered attempt sets, shared by the RPC threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sets: dict[str, _KnownSet] = {}

    def subject_sum(self, collection_id: str, counter: int, digest: bytes,
                    subject_hmac: bytes) -> int | None:
        """The subject's remembered sum, if (counter, digest) is the remembered state."""
        with self._lock:
            known = self._sets.get(collection_id)
            if known is None or known.counter != counter or known.digest != digest:
                return None
            return known.subjects.get(subject_hmac, 0)

    def remember(self, collection_id: str, known: _KnownSet) -> None:
        with self._lock:
            self._sets[collection_id] = known

    def forget(self, collection_id: str) -> None:
        with self._lock:
            self._sets.pop(collection_id, None)

    def advance(self, collection_id: str, before: tuple[int, bytes] | None,
                subject_hmac: bytes, delta: int) -> None:
        """A write of ours committed on state ``before``: one more counter, ``delta`` more
        on the digest and the subject. From any other state, forget (a full check next)."""
        with self._lock:
            known = self._sets.get(collection_id)
            if known is None or before is None or (known.counter, known.digest) != before:
                self._sets.pop(collection_id, None)
                return
            known.counter += 1
            known.digest = LiveSet.add(known.digest, delta)
            left = (known.subjects.get(subject_hmac, 0) + delta) % _MOD
            if left:
                known.subjects[subject_hmac] = left
            else:
                known.subjects.pop(subject_hmac, None)


class AttemptRecords(LiveSetLedger):
    """Attempt rows; every change goes through the ledger's attempt set."""

    @functools.cached_property
    def _known_sets(self) -> _KnownSets:
        return _KnownSets()

    def _attempt_state(self, db: Any, collection_id: str) -> tuple[int, bytes] | None:
        """(counter, digest) of the collection's attempt set, inside a write transaction."""
        found = db.execute("SELECT counter, digest FROM collection_state WHERE collection_id=? "
                           "AND key_version=?", (collection_id, ATTEMPT_SET)).fetchone()
        return (int(found[0]), bytes(found[1])) if found else None

    # -- verification attempts (vault.attempts) ------------------------------------------

    def _attempt_leaf(self, row: AttemptRow) -> int:
        """A row's leaf in its collection's attempt-set commitment."""
        assert self.live_set is not None
        return self.live_set.attempt(row.collection_id, row.subject_hmac, row.credential_hmac,
                                     row.mac)

    def _delete_attempts(self, db: Any, collection_id: str, subject_hmac: bytes,
                         only: AttemptRow | None = None) -> int | None:
        """Delete a subject's attempt rows (``only``: that row as it was read), and take their
        leaves out of the collection's attempt set; returns the change of its digest (None:
        no row deleted)."""
        rows = [AttemptRow(*r) for r in db.execute(
            self._SUBJECT_ROWS, (collection_id, subject_hmac))]
        if only is not None:
            rows = [r for r in rows if r.credential_hmac == only.credential_hmac
                    and r.mac == only.mac]
        delta = 0
        for r in rows:
            db.execute("DELETE FROM verify_attempts WHERE collection_id=? AND subject_hmac=? "
                       "AND credential_hmac=?", (r.collection_id, r.subject_hmac, r.credential_hmac))
            delta -= self._attempt_leaf(r)
            self._change(collection_id, ATTEMPT_SET, -self._attempt_leaf(r))
        return delta if rows else None

    def reseal_attempt_set(self, collection_id: str) -> None:
        """Commit the collection's attempt set to the rows stored now (an administrator's
        unlock, which accepts what a writer may have changed)."""
        assert self.live_set is not None
        with self.transaction() as db:
            digest = self._attempt_set_digest(db.execute(self._SET_ROWS, (collection_id,)))
            found = db.execute("SELECT counter FROM collection_state WHERE collection_id=? AND "
                               "key_version=?", (collection_id, ATTEMPT_SET)).fetchone()
            counter = (found[0] if found else 0) + 1
            db.execute(_STATE_UPSERT,
                       (collection_id, ATTEMPT_SET, counter, digest,
                        self.live_set.seal(collection_id, ATTEMPT_SET, counter, digest)))
        self._known_sets.forget(collection_id)  # a full check next time

    def attempt_set_intact(self, collection_id: str) -> bool:
        """True when the collection's attempt rows sum to their MACed commitment: no row was
        deleted, restored or added behind the vault's back (a lock lifted by deleting it).
        A full check (one MAC, every row); it remembers the set for :meth:`subject_attempts`."""
        return self._verify_attempt_set(collection_id) is not None

    def subject_attempts(self, collection_id: str, subject_hmac: bytes) -> list[AttemptRow] | None:
        """A subject's attempt rows, or None when the collection's attempt set fails its
        check. O(the subject's rows) while the set is the one this store last verified or
        wrote (see the module docstring); else one full check first."""
        found = self._query(
            "SELECT s.counter, s.digest, " + ", ".join(f"a.{c}" for c in self._COLUMNS) +
            " FROM collection_state s LEFT JOIN verify_attempts a ON "
            "a.collection_id=s.collection_id AND a.subject_hmac=? "
            "WHERE s.collection_id=? AND s.key_version=?",
            (subject_hmac, collection_id, ATTEMPT_SET))
        if not found:
            return None
        rows = [AttemptRow(*r[2:]) for r in found if r[2] is not None]
        known = self._known_sets.subject_sum(collection_id, int(found[0][0]), bytes(found[0][1]),
                                             subject_hmac)
        if known is None:  # not the state we know: check all of it (and know it from now)
            verified = self._verify_attempt_set(collection_id)
            if verified is None:
                return None
            return [r for r in verified if r.subject_hmac == subject_hmac]
        if sum(self._attempt_leaf(r) for r in rows) % _MOD != known:
            # Changed behind our back: from now on every subject gets the full check, which
            # fails for the whole collection (as it would have) until an admin reseals.
            self._known_sets.forget(collection_id)
            return None
        return rows

    def _verify_attempt_set(self, collection_id: str) -> list[AttemptRow] | None:
        """Every attempt row of the collection if they sum to the MACed commitment (read in
        one statement: one snapshot), remembered; None if not."""
        assert self.live_set is not None
        found = self._query(
            "SELECT s.counter, s.digest, s.mac, " + ", ".join(f"a.{c}" for c in self._COLUMNS) +
            " FROM collection_state s LEFT JOIN verify_attempts a ON "
            "a.collection_id=s.collection_id WHERE s.collection_id=? AND s.key_version=?",
            (collection_id, ATTEMPT_SET))
        if not found:
            return None
        counter, digest, mac = int(found[0][0]), bytes(found[0][1]), bytes(found[0][2])
        if not self.live_set.check(mac, collection_id, ATTEMPT_SET, counter, digest):
            return None
        rows = [AttemptRow(*r[3:]) for r in found if r[3] is not None]
        known = _KnownSet(counter, digest)
        for r in rows:
            known.subjects[r.subject_hmac] = (known.subjects.get(r.subject_hmac, 0)
                                              + self._attempt_leaf(r)) % _MOD
        if LiveSet.add(bytes(32), sum(known.subjects.values())) != digest:
            return None
        self._known_sets.remember(collection_id, known)
        return rows

    def _attempt_set_digest(self, rows: Iterable[tuple[Any, ...]]) -> bytes:
        """The attempt set's commitment recomputed from a collection's stored rows."""
        return LiveSet.add(bytes(32), sum(self._attempt_leaf(AttemptRow(*r)) for r in rows))

    _COLUMNS = ("collection_id", "subject_hmac", "credential_hmac", "failures", "since",
                "locked_until", "mac")
    _ATTEMPT_COLUMNS = ("collection_id, subject_hmac, credential_hmac, failures, since, "
                        "locked_until, mac")
    _SET_ROWS = f"SELECT {_ATTEMPT_COLUMNS} FROM verify_attempts WHERE collection_id=?"
    _SUBJECT_ROWS = _SET_ROWS + " AND subject_hmac=?"

    def attempt_rows(self, collection_id: str, subject_hmac: bytes) -> list[AttemptRow]:
        return [AttemptRow(*r) for r in self._query(
            self._SUBJECT_ROWS, (collection_id, subject_hmac))]

    @property
    def shared_attempts(self) -> bool:
        """Whether other replicas evaluate attempts on this store (PostgreSQL): then the
        attempts in flight are counted in it (:meth:`reserve_attempt`), not in memory."""
        return bool(self.engine.kind == "postgresql")

    def reserve_attempt(self, reservation: str, collection_id: str, subject_hmac: bytes,
                        credential_hmac: bytes, now: float, ttl: float,
                        check: Callable[[list[AttemptRow], int], None]) -> None:
        """Record one attempt in flight for the pair, in one write transaction (every
        replica's writers hold the same lock) with ``check(subject's rows, attempts in
        flight for the pair)``, which raises to refuse: nothing is then recorded."""
        with self.transaction() as db:
            db.execute("DELETE FROM attempts_in_flight WHERE expires < ?", (now,))
            rows = [AttemptRow(*r) for r in db.execute(
                self._SUBJECT_ROWS, (collection_id, subject_hmac))]
            (inflight,) = db.execute(
                "SELECT COUNT(*) FROM attempts_in_flight WHERE collection_id=? AND "
                "subject_hmac=? AND credential_hmac=?",
                (collection_id, subject_hmac, credential_hmac)).fetchone()
            check(rows, int(inflight))
            db.execute("INSERT INTO attempts_in_flight VALUES (?,?,?,?,?)",
                       (reservation, collection_id, subject_hmac, credential_hmac, now + ttl))

    def release_attempt(self, reservation: str) -> None:
        """Forget an attempt in flight (settled, or its answer never left)."""
        with self.transaction() as db:
            db.execute("DELETE FROM attempts_in_flight WHERE reservation=?", (reservation,))

    def update_attempts(self, collection_id: str, subject_hmac: bytes,
                        change: Callable[[list[AttemptRow]], AttemptRow | None]) -> None:
        """Read a subject's attempt rows and write the row ``change`` returns, in one
        transaction (an exception from ``change`` writes nothing)."""
        with self.transaction() as db:
            before = self._attempt_state(db, collection_id)
            rows = [AttemptRow(*r) for r in db.execute(
                self._SUBJECT_ROWS, (collection_id, subject_hmac))]
            row = change(rows)
            if row is None:
                return
            delta = self._attempt_leaf(row)
            for previous in rows:
                if previous.credential_hmac == row.credential_hmac:
                    delta -= self._attempt_leaf(previous)
            db.execute(_ATTEMPT_UPSERT,
                       (row.collection_id, row.subject_hmac, row.credential_hmac,
                        row.failures, row.since, row.locked_until, row.mac))
            self._change(collection_id, ATTEMPT_SET, delta)
        self._known_sets.advance(collection_id, before, subject_hmac, delta)

    def expired_attempt_rows(self, now: float, window: float) -> list[AttemptRow]:
        """Rows neither locked nor holding failures still in their window."""
        return [AttemptRow(*r) for r in self._query(
            f"SELECT {self._ATTEMPT_COLUMNS} FROM verify_attempts "
            "WHERE locked_until <= ? AND since + ? <= ?", (now, window, now))]

    def delete_attempt_row(self, row: AttemptRow) -> None:
        """Delete one row as it was read (same MAC), nothing newer."""
        with self.transaction() as db:
            before = self._attempt_state(db, row.collection_id)
            delta = self._delete_attempts(db, row.collection_id, row.subject_hmac, only=row)
        if delta is not None:
            self._known_sets.advance(row.collection_id, before, row.subject_hmac, delta)

    def delete_attempt_rows(self, collection_id: str, subject_hmac: bytes) -> None:
        """Forget every attempt row of a subject."""
        with self.transaction() as db:
            before = self._attempt_state(db, collection_id)
            delta = self._delete_attempts(db, collection_id, subject_hmac)
        if delta is not None:
            self._known_sets.advance(collection_id, before, subject_hmac, delta)
