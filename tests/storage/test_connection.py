"""The storage seam on both engines: each thread reads on its own connection (a read does
not wait for a write transaction in progress, and sees only committed rows)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from vault.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    location = tmp_path / "vault.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = Store(location)
    yield s
    s.close()


def test_a_read_does_not_wait_for_a_write_in_progress(store: Store) -> None:
    store.put_wrapped_key("a", 1, b"committed")
    in_transaction, read_done = threading.Event(), threading.Event()
    seen: list[object] = []

    def write() -> None:
        with store.transaction() as db:
            db.execute("INSERT INTO wrapped_keys(name, version, blob) VALUES (?,?,?)",
                       ("b", 1, b"uncommitted"))
            in_transaction.set()
            read_done.wait()  # a read that waited for this transaction would never finish

    def read() -> None:
        in_transaction.wait()
        seen.extend([store.wrapped_key("a", 1), store.wrapped_key("b", 1)])
        read_done.set()

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [b"committed", None]  # the write in progress is not visible
    assert store.wrapped_key("b", 1) == b"uncommitted"  # and is once committed


def test_each_thread_has_its_own_reader_gone_with_it_or_closed_with_the_store(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "vault.db")
    ids: list[int] = []
    # All three readers alive at once: an id is only unique among living objects, and a
    # finished thread's reader is freed (its address may be handed to the next one).
    all_read = threading.Barrier(3, timeout=30)

    def read() -> None:
        store.has_wrapped_keys()
        ids.append(id(store._local.reader))
        all_read.wait()

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 3
    assert not list(store._readers)  # each thread's reader went with its thread
    store.has_wrapped_keys()  # this thread's stays until the store closes
    (reader,) = list(store._readers)
    store.close()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        reader.raw.execute("SELECT 1")
