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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vault.domain.errors import Unavailable
from vault.keys.integrity import LiveSet
from vault.storage.sqlite import SqliteEngine


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
            self._delta = {}
            yield db
            self._commit_states(db)

    def checkpoint_wal(self) -> None:
        """Push freed row images out of the engine's log and files (see each engine)."""
        with self._lock:
            self.engine.checkpoint_wal()

    def trim_log(self) -> bool:
        """Give back the log's space after a bulk write (see each engine); False if busy."""
        with self._lock:
            return bool(self.engine.trim_log())

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """One read statement on this thread's read connection (made at its first read)."""
        reader = getattr(self._local, "reader", None)
        if reader is None:
            with self._readers_lock:
                if self._closed:
                    raise Unavailable("storage unavailable: the store is closed")
                reader = self.engine.reader()
                self._readers.add(reader)
            self._local.reader = reader
        return reader.query(sql, args)  # type: ignore[no-any-return]

    def _commit_states(self, db: Any) -> None:
        """Called inside every write transaction before COMMIT: the live-set ledger
        (vault.storage.live_set) folds the transaction's changes into the commitment."""
