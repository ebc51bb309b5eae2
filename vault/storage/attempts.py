"""Verification attempts (vault.attempts): one MACed row per (subject, credential), and per
collection an attempt-set commitment in the live-set ledger, so that a row deleted or
restored behind the vault's back (a lock lifted) is found."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


class AttemptRecords(LiveSetLedger):
    """Attempt rows; every change goes through the ledger's attempt set."""

    # -- verification attempts (vault.attempts) ------------------------------------------

    def _attempt_leaf(self, row: AttemptRow) -> int:
        """A row's leaf in its collection's attempt-set commitment."""
        assert self.live_set is not None
        return self.live_set.attempt(row.collection_id, row.subject_hmac, row.credential_hmac,
                                     row.mac)

    def _delete_attempts(self, db: Any, collection_id: str, subject_hmac: bytes,
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
            digest = self._attempt_set_digest(db.execute(self._SET_ROWS, (collection_id,)))
            found = db.execute("SELECT counter FROM collection_state WHERE collection_id=? AND "
                               "key_version=?", (collection_id, ATTEMPT_SET)).fetchone()
            counter = (found[0] if found else 0) + 1
            db.execute(_STATE_UPSERT,
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
        rows = self._query(self._SET_ROWS, (collection_id,))
        return self._attempt_set_digest(rows) == bytes(state[1])

    def _attempt_set_digest(self, rows: Iterable[tuple[Any, ...]]) -> bytes:
        """The attempt set's commitment recomputed from a collection's stored rows."""
        return LiveSet.add(bytes(32), sum(self._attempt_leaf(AttemptRow(*r)) for r in rows))

    _ATTEMPT_COLUMNS = ("collection_id, subject_hmac, credential_hmac, failures, since, "
                        "locked_until, mac")
    _SET_ROWS = f"SELECT {_ATTEMPT_COLUMNS} FROM verify_attempts WHERE collection_id=?"

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
                db.execute(_ATTEMPT_UPSERT,
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
        """Forget every attempt row of a subject."""
        with self.transaction() as db:
            self._delete_attempts(db, collection_id, subject_hmac)
