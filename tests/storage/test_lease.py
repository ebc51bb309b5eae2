"""The write lease on a real PostgreSQL server: one holder at a time, takeover after expiry,
and fencing: a holder that lost the lease (paused past its expiry while another took it
over) has every gallery write refused inside its own transaction, nothing written."""

from __future__ import annotations

import time

import psycopg
import pytest

from vault.domain.errors import Unavailable
from vault.domain.records import CollectionKeyRow, CollectionRow
from vault.keys.hsm import Hsm
from vault.keys.integrity import Integrity, LiveSet
from vault.storage.lease import WriteLease
from vault.store import Store


def _store(url: str, hsm: Hsm) -> Store:
    store = Store(url)
    store.live_set = LiveSet(b"k" * 32, Integrity(hsm))
    return store


def _collections(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT collection_id FROM collections ORDER BY 1")]


def test_one_holder_then_takeover_then_fencing(pg_url: str, hsm: Hsm) -> None:
    a_store, b_store = _store(pg_url, hsm), _store(pg_url, hsm)
    try:
        a, b = WriteLease(a_store, "node-a", ttl=0.5), WriteLease(b_store, "node-b", ttl=0.5)
        a_store.fence, b_store.fence = a.fence, b.fence
        assert a.acquire() and a.term == 1
        assert not b.acquire() and not b.held
        with pytest.raises(Unavailable, match="standby"):
            b.require()
        # The holder writes; the standby's gallery writes are refused in the transaction.
        a_store.insert_collection(CollectionRow("c1", 8, 0.9, 1, 1, b"mac"),
                                  CollectionKeyRow("c1", 1, "{}", b"public", b"sealed"))
        with pytest.raises(Unavailable, match="nothing was written"):
            b_store.insert_collection(CollectionRow("c2", 8, 0.9, 1, 1, b"mac"),
                                      CollectionKeyRow("c2", 1, "{}", b"public", b"sealed"))
        assert a.renew()
        # a pauses past its expiry; b takes over with the next term.
        time.sleep(0.8)
        assert b.acquire() and b.term == 2
        # a resumes believing it holds the lease (term 1): its write is fenced.
        assert a.held
        with pytest.raises(Unavailable, match="nothing was written"):
            a_store.insert_collection(CollectionRow("c3", 8, 0.9, 1, 1, b"mac"),
                                      CollectionKeyRow("c3", 1, "{}", b"public", b"sealed"))
        assert not a.renew() and not a.held  # and it learns it at its next renewal
        b_store.insert_collection(CollectionRow("c4", 8, 0.9, 1, 1, b"mac"),
                                  CollectionKeyRow("c4", 1, "{}", b"public", b"sealed"))
        assert _collections(pg_url) == ["c1", "c4"]
        # Reads and 1:1 attempt bookkeeping are not gallery writes: a standby makes them.
        assert a_store.collection("c4") is not None
        # A node restarted on the same data directory takes its own lease back at once.
        b2 = WriteLease(a_store, "node-b", ttl=0.5)
        assert b2.acquire() and b2.term == 3
        b2.release()
        assert a.acquire() and a.term == 4  # released: free at once
        # The feed names what each committed transaction touched, in commit order.
        rows = a_store.changes_since(0)
        assert [r[1] for r in rows] == ["c1", "c4"]
        assert a_store.last_change() == rows[-1][0]
    finally:
        a_store.close()
        b_store.close()
