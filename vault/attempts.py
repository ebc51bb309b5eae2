"""Attempt limits for 1:1 verification, per (subject, credential), that hold under concurrency.

An attempt is *reserved* before anything is scored, under one lock that checks the stored
lock and counts the attempts in flight with the recorded failures; a failure is written
(fsynced) before its answer leaves. So at most ``max_failures`` verifications of a subject
are ever evaluated for one credential before it locks, however many arrive at once. Rules:

- ``max_failures`` failures within ``lockout_seconds`` of the first lock the (subject,
  credential) pair for ``lockout_seconds``: every verification, genuine or not, gets
  RESOURCE_EXHAUSTED until then; attempts in flight count against the limit;
- a success releases its own reservation and nothing else: it never clears a lock nor
  resets earlier failures (four failures and a success, repeated, lock);
- the count is per credential, so one matcher cannot lock a subject for everyone; a
  subject locked for ``alert_credentials`` credentials at once raises an alert (log line
  and audit entry);
- each row carries a MAC keyed in the HSM and names the credential by an HMAC only; a row
  that fails its MAC keeps the subject locked (DATA_LOSS) until an admin unlocks it.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from vault import logs
from vault.domain.errors import DataLoss, ResourceExhausted
from vault.domain.records import AttemptRow
from vault.keys.hsm import INDEX
from vault.keys.integrity import Integrity, encode
from vault.keys.roles import Mac
from vault.store import Store

log = logs.get("vault.attempts")


@dataclass(frozen=True)
class AttemptLimits:
    """After ``max_failures`` failed 1:1 matches (Face ID locks after 5) within
    ``lockout_seconds``, the (subject, credential) pair is locked for ``lockout_seconds``.
    ``alert_credentials``: locked for that many credentials at once raises an alert."""

    max_failures: int = 5  # 0: no limit (accuracy tests, trusted batch scripts)
    lockout_seconds: float = 300.0
    alert_credentials: int = 3


# How long an attempt in flight counts on a shared store if its replica never settles it
# (it died mid-evaluation): far above any verification's deadline.
IN_FLIGHT_SECONDS = 120.0


@dataclass(frozen=True)
class Reservation:
    """One reserved attempt, to be settled with its outcome."""

    collection_id: str
    subject_hmac: bytes
    credential_hmac: bytes
    shared_id: str | None = None  # its row in a shared store's attempts in flight


class Attempts:
    """Reserves and settles verification attempts in the store (see the module docstring)."""

    def __init__(self, store: Store, integrity: Integrity, hsm: Mac, limits: AttemptLimits,
                 clock: Callable[[], float], on_event: Callable[[str, str, bytes, str], None]) -> None:
        self._store = store
        self._integrity = integrity
        self._hsm = hsm
        self.limits = limits
        self._clock = clock
        self._on_event = on_event  # (kind, collection, subject_hmac, outcome): audited
        self._lock = threading.RLock()
        # Attempts being evaluated, per (collection, subject, credential): in memory where
        # one server serves a data directory (server.pid; an evaluation whose answer never
        # left, a crash, gives nothing away); in the store where replicas share it.
        self._inflight: dict[tuple[str, bytes, bytes], int] = {}

    def credential_index(self, collection_id: str, credential: str) -> bytes:
        """The credential as stored: an HMAC keyed in the HSM, never the name."""
        return self._hsm.hmac(INDEX, encode("credential", collection_id, credential))

    def _fields(self, row: AttemptRow) -> tuple[str, *tuple[bytes | str | int | None, ...]]:
        return ("attempts", row.collection_id, row.subject_hmac, row.credential_hmac,
                row.failures, float(row.since).hex(), float(row.locked_until).hex())

    def _sign(self, row: AttemptRow) -> AttemptRow:
        return AttemptRow(row.collection_id, row.subject_hmac, row.credential_hmac, row.failures,
                          row.since, row.locked_until, self._integrity.mac(*self._fields(row)))

    def _checked(self, row: AttemptRow) -> AttemptRow:
        if not self._integrity.check(row.mac, *self._fields(row)):
            log.error("integrity failure", kind="verify_attempts", collection_id=row.collection_id)
            self._on_event("integrity", row.collection_id, row.subject_hmac,
                           "DATA_LOSS verify_attempts")
            raise DataLoss("the attempt record of this subject failed its integrity check: it "
                           "stays locked until an administrator unlocks it")
        return row

    def reserve(self, collection_id: str, subject_hmac: bytes, credential: str) -> Reservation | None:
        """Take one attempt before it is evaluated: RESOURCE_EXHAUSTED when the pair is
        locked or its recorded failures and the attempts in flight reach the limit. Every
        row of the subject is MAC-checked: one that fails keeps it locked (DATA_LOSS)."""
        if self.limits.max_failures <= 0:
            return None
        cred = self.credential_index(collection_id, credential)
        key = (collection_id, subject_hmac, cred)
        now = self._clock()
        with self._lock:  # check and reserve under one lock (one server per data directory)
            stored = self._store.subject_attempts(collection_id, subject_hmac)
            if stored is None:
                log.error("integrity failure", kind="attempt_set", collection_id=collection_id)
                self._on_event("integrity", collection_id, subject_hmac, "DATA_LOSS attempt_set")
                raise DataLoss("the attempt records of this collection failed their integrity "
                               "check (one was deleted or restored): 1:1 verification stays "
                               "refused until an administrator unlocks a subject")
            if self._store.shared_attempts:
                # Other replicas evaluate attempts too: the check and the reservation in one
                # write transaction of the shared store, which every replica's writes wait on.
                shared_id = uuid.uuid4().hex
                self._store.reserve_attempt(
                    shared_id, collection_id, subject_hmac, cred, now, IN_FLIGHT_SECONDS,
                    lambda rows, inflight: self._refuse_if_full(
                        self._row(rows, collection_id, subject_hmac, cred, now), inflight, now))
                return Reservation(collection_id, subject_hmac, cred, shared_id)
            row = self._row(stored, collection_id, subject_hmac, cred, now)
            self._refuse_if_full(row, self._inflight.get(key, 0), now)
            self._inflight[key] = self._inflight.get(key, 0) + 1
        return Reservation(collection_id, subject_hmac, cred)

    def _refuse_if_full(self, row: AttemptRow, inflight: int, now: float) -> None:
        """RESOURCE_EXHAUSTED when the pair is locked, or its recorded failures and its
        attempts in flight reach the limit."""
        wait = row.locked_until - now
        if wait > 0:
            raise ResourceExhausted("too many failed verifications for this subject: "
                                    f"locked, retry in {math.ceil(wait)} s")
        if self._failures(row, now) + inflight >= self.limits.max_failures:
            raise ResourceExhausted("too many verifications of this subject in flight "
                                    "or failed: retry later")

    def release(self, reservation: Reservation | None) -> None:
        """Give back an attempt whose answer never left (the call failed or was cancelled)."""
        if reservation is None:
            return
        if reservation.shared_id is not None:
            self._store.release_attempt(reservation.shared_id)
            return
        key = (reservation.collection_id, reservation.subject_hmac, reservation.credential_hmac)
        with self._lock:
            left = self._inflight.pop(key, 1) - 1
            if left > 0:
                self._inflight[key] = left

    def settle(self, reservation: Reservation | None, success: bool) -> None:
        """Record the outcome before the answer leaves: a success writes nothing; a failure
        is persisted, and locks the pair once the failures reach the limit. A lock is never
        shortened. If the failure cannot be written, this raises and no answer leaves."""
        if reservation is None:
            return
        cid, subject_hmac, cred = (reservation.collection_id, reservation.subject_hmac,
                                   reservation.credential_hmac)
        now = self._clock()
        locked_for = 0

        def failed(rows: list[AttemptRow]) -> AttemptRow:
            nonlocal locked_for
            rows = [self._checked(r) for r in rows]
            row = next((r for r in rows if r.credential_hmac == cred),
                       AttemptRow(cid, subject_hmac, cred, 0, now, 0.0, b""))
            failures, since = self._failures(row, now) + 1, row.since
            if failures == 1:
                since = now
            locked_until = row.locked_until
            if failures >= self.limits.max_failures and locked_until <= now:
                locked_until, failures = now + self.limits.lockout_seconds, 0
                locked_for = 1 + sum(r.locked_until > now for r in rows if r.credential_hmac != cred)
            return self._sign(AttemptRow(cid, subject_hmac, cred, failures, since, locked_until,
                                         b""))

        try:
            if not success:
                with self._lock:
                    self._store.update_attempts(cid, subject_hmac, failed)
        finally:
            self.release(reservation)
        if locked_for:
            log.warning("subject locked after failed verifications", collection_id=cid,
                        count=self.limits.max_failures)
        if locked_for >= self.limits.alert_credentials > 0:
            log.warning("subject locked for several credentials", collection_id=cid,
                        count=locked_for)
            self._on_event("alert", cid, subject_hmac, f"LOCKED credentials={locked_for}")

    def _row(self, stored: list[AttemptRow], collection_id: str, subject_hmac: bytes, cred: bytes,
             now: float) -> AttemptRow:
        """The pair's row among the subject's ``stored`` rows (every one MAC-checked), or an
        empty one."""
        rows = [self._checked(r) for r in stored]
        return next((r for r in rows if r.credential_hmac == cred),
                    AttemptRow(collection_id, subject_hmac, cred, 0, now, 0.0, b""))

    def _failures(self, row: AttemptRow, now: float) -> int:
        """Recorded failures still in the window (older ones are forgotten)."""
        return 0 if row.since + self.limits.lockout_seconds <= now else row.failures

    def prune(self) -> int:
        """Forget rows that hold nothing any more (expired, e.g. tries on unknown subjects);
        a row that fails its MAC stays, to be reported when its subject is next tried."""
        now = self._clock()
        pruned = 0
        with self._lock:
            for row in self._store.expired_attempt_rows(now, self.limits.lockout_seconds):
                if self._integrity.check(row.mac, *self._fields(row)):
                    self._store.delete_attempt_row(row)
                    pruned += 1
        return pruned

    def unlock(self, collection_id: str, subject_hmac: bytes) -> int:
        """Forget every attempt record of the subject (damaged ones too); returns how many
        credentials were locked."""
        now = self._clock()
        with self._lock:
            rows = self._store.attempt_rows(collection_id, subject_hmac)
            self._store.delete_attempt_rows(collection_id, subject_hmac)
            self._store.reseal_attempt_set(collection_id)  # the admin accepts what is stored
        return sum(r.locked_until > now or not self._integrity.check(r.mac, *self._fields(r))
                   for r in rows)

