"""The write lease of replicas on one PostgreSQL database: one primary changes gallery state.

Every vault on the database matches and counts 1:1 attempts; only the holder of the lease
enrolls, imports, deletes, rotates keys, administers collections and runs maintenance
(the others answer those with UNAVAILABLE and follow the primary's writes, see
:mod:`vault.ops.follow`). The lease is one row, ``write_lease``: holder, term, expiry on the
database's clock. The holder renews it; when it stops (killed, cut off), another replica
takes it once it has expired, with the next term.

Fencing: every transaction that changes gallery state checks, under the database's write
lock (the one every write transaction takes first), that the row still names this holder
and this term. A primary that was paused or cut off past its expiry, and then resumes
writing, is refused inside its own transaction: nothing it writes after a takeover
commits. The holder id is the node's (``DIR/node_id``), so a vault restarted on the same
data directory (``DIR/server.pid``: the old process is gone) takes its own lease back at
once.
"""

from __future__ import annotations

from typing import Any

from vault import logs
from vault.domain.errors import Unavailable
from vault.storage.connection import Connection

log = logs.get("vault.lease")

_NAME = "primary"

STANDBY = ("this vault replica is a standby (another replica holds the write lease): send "
           "enrollments, imports, deletions and administration to the primary; matches are "
           "served here")


class WriteLease:
    """This process's view of the write lease (PostgreSQL only)."""

    def __init__(self, store: Connection, holder: str, ttl: float = 10.0) -> None:
        self.store, self.holder, self.ttl = store, holder, ttl
        self.term: int | None = None  # set while this process holds the lease

    @property
    def held(self) -> bool:
        return self.term is not None

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or already this node's (a restart):
        True when this process holds it afterwards, with a new term."""
        with self.store.transaction() as db:
            db.execute("INSERT INTO write_lease VALUES (?, '', 0, now()) ON CONFLICT (name) "
                       "DO NOTHING", (_NAME,))
            found = db.execute(
                "UPDATE write_lease SET holder=?, term=term+1, expires_at=now() + "
                "make_interval(secs => ?) WHERE name=? AND (holder=? OR holder='' OR "
                "expires_at < now()) RETURNING term", (self.holder, self.ttl, _NAME,
                                                       self.holder)).fetchone()
        if found is None:
            return False
        self.term = int(found[0])
        log.info("write lease taken: this replica is the primary", term=self.term)
        return True

    def renew(self) -> bool:
        """Extend the lease; False (and no longer held) when another replica took it."""
        if self.term is None:
            return False
        with self.store.transaction() as db:
            found = db.execute(
                "UPDATE write_lease SET expires_at=now() + make_interval(secs => ?) WHERE "
                "name=? AND holder=? AND term=? RETURNING term",
                (self.ttl, _NAME, self.holder, self.term)).fetchone()
        if found is None:
            log.warning("write lease lost: this replica is a standby", term=self.term)
            self.term = None
            return False
        return True

    def release(self) -> None:
        """Let another replica take over at once (a clean shutdown)."""
        if self.term is None:
            return
        term, self.term = self.term, None
        with self.store.transaction() as db:
            db.execute("UPDATE write_lease SET expires_at=now() - interval '1 second' WHERE "
                       "name=? AND holder=? AND term=?", (_NAME, self.holder, term))

    def fence(self, db: Any) -> None:
        """Inside a write transaction that changes gallery state: UNAVAILABLE unless this
        process holds the lease's current term (the transaction then rolls back)."""
        found = db.execute("SELECT holder, term FROM write_lease WHERE name=?",
                           (_NAME,)).fetchone()
        if self.term is None or found is None or (found[0], int(found[1])) != (self.holder, self.term):
            raise Unavailable(STANDBY + "; nothing was written")

    def require(self) -> None:
        """UNAVAILABLE at once when this process is not the primary."""
        if self.term is None:
            raise Unavailable(STANDBY)
