"""The storage seam: the store's rows go through one engine, SQLite (the embedded default,
a file in the data directory) or PostgreSQL (a ``postgresql://`` URL, shared by replicas).

Both run the same SQL: ``?`` placeholders, ``ON CONFLICT`` upserts and the column types
both understand; an engine only supplies connections, transactions that exclude every
other writer of the database (the live-set ledger is read-modify-write), and the mapping
of its failures to precise vault errors.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vault.domain.errors import Unavailable
from vault.keys.integrity import LiveSet
from vault.storage.sqlite import SqliteEngine

# The ``tier`` of a change-feed row about a collection itself (its row, key versions, jobs),
# not about one of its pages or blocks.
COLLECTION_CHANGE = -1


def is_url(location: Path | str) -> bool:
    """True when ``location`` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def upsert(table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    """INSERT of a whole row that replaces the row with the same ``key`` (both engines)."""
    updates = ", ".join(f"{c}=excluded.{c}" for c in columns if c not in key)
    return (f"INSERT INTO {table}({', '.join(columns)}) VALUES ({','.join('?' * len(columns))}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}")


class Connection:
    """The store's engine: one write connection behind a lock, whose transactions the
    live-set ledger folds its changes into, and one read connection per thread (reads
    wait for no writer: WAL on SQLite, MVCC on PostgreSQL; each sees committed rows)."""

    def __init__(self, location: Path | str) -> None:
        self._lock = threading.RLock()
        self._local = threading.local()
        # Every thread's reader, to close them with the store; a thread's goes with it.
        self._readers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._readers_lock = threading.Lock()  # not the writer's: a read never waits for it
        self._closed = False
        # Set by the vault: keys the live-set commitment every write transaction updates.
        self.live_set: LiveSet | None = None
        self._delta: dict[tuple[str, int], int] = {}
        # This transaction's changes to what galleries hold: (collection, key version, tier,
        # loc) of each page or block touched (COLLECTION_CHANGE: the collection's own rows).
        # PostgreSQL publishes them in ``changes`` for replicas (vault.ops.follow).
        self._touched: set[tuple[str, int, int, int]] = set()
        # Set by a replicated vault (vault.storage.lease): called inside every transaction
        # that changes gallery state, under the write lock; raises when this process no
        # longer holds the write lease (fencing a primary that lost it).
        self.fence: Callable[[Any], None] | None = None
        self.engine: Any
        self.path: Path | None
        if is_url(location):
            from vault.storage.postgres import PostgresEngine  # psycopg only when used
            self.engine, self.path = PostgresEngine(str(location)), None
        else:
            self.path = Path(location)
            self.engine = SqliteEngine(self.path)

    @property
    def _db(self) -> Any:
        """The engine's raw connection (tests that copy a SQLite database use it)."""
        return self.engine.raw

    def close(self) -> None:
        """Close the write connection and every thread's read connection."""
        with self._lock, self._readers_lock:
            self._closed = True
            for reader in list(self._readers):
                reader.close()
            self.engine.close()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A write transaction that excludes every other writer; rolled back on any
        exception. Storage failures become :class:`ResourceExhausted` or
        :class:`Unavailable`: either way nothing was written."""
        with self._lock, self.engine.transaction() as db:
            self._delta, self._touched = {}, set()
            yield db
            if self._touched:
                self._publish(db)
            self._commit_states(db)

    def _touch(self, collection_id: str, key_version: int, tier: int, loc: int) -> None:
        """Record that this transaction changes a page or block (or the collection)."""
        self._touched.add((collection_id, key_version, tier, loc))

    def _publish(self, db: Any) -> None:
        """Inside a transaction that changes gallery state: fence, then feed the change."""
        touched, self._touched = sorted(self._touched), set()
        if self.fence is not None:
            self.fence(db)
        if self.engine.feeds_changes:
            db.executemany("INSERT INTO changes (collection_id, key_version, tier, loc) "
                           "VALUES (?,?,?,?)", touched)

    def changes_since(self, seq: int) -> list[tuple[int, str, int, int, int]]:
        """(seq, collection, key version, tier, loc) of the change feed after ``seq``, in
        commit order (PostgreSQL; empty on SQLite, whose file has one writer)."""
        if not self.engine.feeds_changes:
            return []
        return self._query("SELECT seq, collection_id, key_version, tier, loc FROM changes "
                           "WHERE seq>? ORDER BY seq", (seq,))

    def last_change(self) -> int:
        """The newest change-feed position (0 if none)."""
        if not self.engine.feeds_changes:
            return 0
        return int(self._query("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0])

    def first_change(self) -> int:
        """The oldest change-feed position still kept (0 if none)."""
        if not self.engine.feeds_changes:
            return 0
        return int(self._query("SELECT COALESCE(MIN(seq), 0) FROM changes")[0][0])

    def prune_changes(self, seconds: float) -> None:
        """Drop feed rows older than ``seconds``, always keeping the newest (a standby
        behind the oldest kept row reloads everything, vault.ops.follow)."""
        if self.engine.feeds_changes:
            with self._lock:
                self.engine.execute("DELETE FROM changes WHERE at < now() - make_interval(secs => ?) "
                                    "AND seq < (SELECT MAX(seq) FROM changes)", (seconds,))

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Run this thread's reads inside one consistent snapshot (PostgreSQL: a
        REPEATABLE READ, READ ONLY transaction on the thread's reader)."""
        with self._reader().snapshot():
            yield

    @contextmanager
    def exclusive_start(self) -> Iterator[None]:
        """Hold off every other vault starting on this database (PostgreSQL: a session
        advisory lock) while this one makes or reads its keys and bindings."""
        with self.engine.exclusive_start():
            yield

    def checkpoint_wal(self) -> None:
        """Push freed row images out of the engine's log and files (see each engine)."""
        with self._lock:
            self.engine.checkpoint_wal()

    def trim_log(self) -> bool:
        """Give back the log's space after a bulk write (see each engine); False if busy."""
        with self._lock:
            return bool(self.engine.trim_log())

    def _reader(self) -> Any:
        """This thread's read connection (made at its first read)."""
        reader = getattr(self._local, "reader", None)
        if reader is None:
            with self._readers_lock:
                if self._closed:
                    raise Unavailable("storage unavailable: the store is closed")
                reader = self.engine.reader()
                self._readers.add(reader)
            self._local.reader = reader
        return reader

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """One read statement on this thread's read connection."""
        return self._reader().query(sql, args)  # type: ignore[no-any-return]

    def _commit_states(self, db: Any) -> None:
        """Called inside every write transaction before COMMIT: the live-set ledger
        (vault.storage.live_set) folds the transaction's changes into the commitment."""
