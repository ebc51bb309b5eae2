"""Replicas on one PostgreSQL database: the write lease, and standbys following the primary.

Every write transaction that changes gallery state lists the pages, blocks and
collections it touched in the ``changes`` feed (:mod:`vault.storage.connection`), in commit
order. A standby reads the feed every ``refresh_interval`` seconds (and at once when a
request finds rows its memory does not have yet) and brings each touched holder to its
committed state, all read in one snapshot: a new page or block generation is read and
checked (row MAC, block digest) and installed; its slot owners are read from the
template rows. So an enrollment acknowledged by the primary matches here within one
refresh interval; a deletion stops matching here at once, because a 1:N names a subject
and a 1:1 scores one only after reading its live rows (:mod:`vault.ops.match`), and a
refresh follows. A key rotation's target version is followed like the current one and
switched to with the collection row.

The lease (:mod:`vault.storage.lease`) is taken at start if free and renewed every
``ttl / 3``; a standby takes it over when it expires, after catching up with the feed,
and only then enrolls or runs maintenance.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from vault import loading, logs
from vault.core import Core
from vault.domain.errors import VaultError
from vault.domain.records import BLOCK, DONE, LIVE, PAGE
from vault.gallery import CollectionGallery
from vault.storage.connection import COLLECTION_CHANGE
from vault.storage.lease import WriteLease

log = logs.get("vault.follow")

class Replica:
    """This vault's part in a replicated deployment: its lease and its place in the feed."""

    def __init__(self, core: Core, holder: str, seq: int, ttl: float = 10.0,
                 refresh_interval: float = 0.5,
                 on_promote: Callable[[], None] | None = None) -> None:
        self.core = core
        self.on_promote = on_promote  # resumes the key rotations the last primary left
        self.lease = WriteLease(core.store, holder, ttl)
        self.refresh_interval = refresh_interval
        self.seq = seq  # the feed's position read before this vault loaded its galleries
        self.lock = threading.Lock()  # one catch-up at a time
        self.thread: threading.Thread | None = None
        self._last_renew = 0.0

    @property
    def primary(self) -> bool:
        return self.lease.held

    def require_primary(self) -> None:
        """UNAVAILABLE unless this replica holds the write lease."""
        self.lease.require()

    def catch_up(self, force: bool = False) -> int:
        """Apply the feed's newest changes now (see :func:`catch_up`)."""
        return catch_up(self.core, force)

    def start(self) -> None:
        """Take the lease if free, fence this store's writes with it, start following."""
        self.core.store.fence = self.lease.fence
        self._lease_tick()
        self.thread = threading.Thread(target=self._run, name="vault-follow", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop following and hand the lease over (after the thread has stopped)."""
        if self.thread is not None:
            self.thread.join(timeout=30)
        try:
            self.lease.release()
        except VaultError:
            pass  # the database is away: the lease expires by itself

    def _run(self) -> None:
        stop = self.core.stopping
        while not stop.wait(self.refresh_interval):
            try:
                self._lease_tick()
                if not self.primary:
                    catch_up(self.core)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
                log.warning("replica refresh deferred", error_type=type(exc).__name__)

    def _lease_tick(self) -> None:
        now = time.monotonic()
        if self.primary:
            if now - self._last_renew >= self.lease.ttl / 3:
                self._last_renew = now
                if self.lease.renew():
                    # Our own writes: nothing to follow (the feed moves past them).
                    with self.lock:
                        self.seq = max(self.seq, self.core.store.last_change())
            return
        if now - self._last_renew < self.lease.ttl / 3:
            return
        self._last_renew = now
        catch_up(self.core)  # whatever the previous primary committed, before writing
        if self.lease.acquire():
            catch_up(self.core, force=True)  # and what it committed before we took over
            if self.on_promote is not None:
                self.on_promote()


def catch_up(core: Core, force: bool = False) -> int:
    """Bring the galleries to the feed's newest committed state; how many changes were
    applied. ``force``: also on the primary (at a takeover)."""
    replica = core.replica
    if not isinstance(replica, Replica) or (replica.primary and not force):
        return 0
    with replica.lock, core.store.snapshot():
        changes = core.store.changes_since(replica.seq)
        if not changes:
            return 0
        if core.store.first_change() > replica.seq + 1:  # pruned past us
            log.warning("replica fell behind the change feed: reloading every collection")
            _reload_all(core)
        else:
            holders = sorted({(c, v, t, loc) for _, c, v, t, loc in changes if t != COLLECTION_CHANGE},
                             key=lambda h: h[2] == PAGE)  # blocks first: a checkpoint's target
            for cid, version, tier, loc in holders:      # before its pages go
                gallery = core.gallery(cid, version)
                if gallery is not None:
                    _refresh_holder(core, gallery, tier, loc)
            for cid in sorted({c for _, c, _, t, _ in changes if t == COLLECTION_CHANGE}):
                _refresh_collection(core, cid)
        replica.seq = changes[-1][0]
    log.info("replica caught up", count=len(changes))
    return len(changes)


def _groups(core: Core, gallery: CollectionGallery, tier: int, loc: int, size: int,
            fill: int) -> np.ndarray:
    """Slot owners of a holder from its template rows (two rows on one slot: neither)."""
    groups = np.full(size, -1, np.int32)
    seen: set[int] = set()
    for t in core.store.templates_in(gallery.collection_id, gallery.key_version, tier, loc):
        if t.state != LIVE or not 0 <= t.slot < fill:
            continue
        groups[t.slot] = -1 if t.slot in seen else gallery.group(t.subject_hmac)
        seen.add(t.slot)
    return groups


def _refresh_holder(core: Core, gallery: CollectionGallery, tier: int, loc: int) -> None:
    """One page or block to its committed state (gone: no live slot)."""
    cid, version = gallery.collection_id, gallery.key_version
    if tier == PAGE:
        # Numbers are never reused (dead rows may still name them), also after a takeover.
        gallery.reserve_page_numbers(loc + 1)
        found = core.store.page(cid, version, loc)
        page = gallery.pages.get(loc)
        if found is None:
            gallery.drop_pages([loc])
            return
        groups = _groups(core, gallery, PAGE, loc, gallery.page_slots, found.fill)
        if page is None or page.generation != found.generation:
            page = loading.load_page(core, gallery, found)
            if page is None:
                _damaged(core, gallery, "page")
                return
            page.groups = groups
            gallery.install_page(page)
        else:
            gallery.set_owners(PAGE, loc, groups)
        return
    gallery.reserve_block_numbers(loc + 1)
    row = core.store.block(cid, version, loc)
    block = gallery.blocks.get(loc)
    if row is None:
        if block is not None:
            gallery.set_owners(BLOCK, loc, np.full(gallery.params.slots, -1, np.int32))
        return
    groups = _groups(core, gallery, BLOCK, loc, gallery.params.slots, row.fill)
    if block is None or block.generation != row.generation:
        block = loading.load_block(core, gallery, row)
        if block is None:
            _damaged(core, gallery, "block")
            return
        block.groups = groups
        gallery.install_block(block, keep_owners=False)
    else:
        gallery.set_owners(BLOCK, loc, groups)


def _damaged(core: Core, gallery: CollectionGallery, kind: str) -> None:
    gallery.damaged = True  # a 1:N over it would be a silent non-match: DATA_LOSS
    core.integrity_failure(kind, gallery.collection_id)


def _refresh_collection(core: Core, cid: str) -> None:
    """A collection's row, key versions and rotation as the primary left them."""
    row = core.store.collection(cid)
    current = core.current_galleries.get(cid)
    if row is None:  # deleted: its keys go with it
        with core.switch_lock:
            core.current_galleries.pop(cid, None)
            core.next_galleries.pop(cid, None)
        if current is not None:
            current.retired = True
            core.retire_key_version(cid, current.key_version)
        return
    if current is None:
        loading.load_collection(core, row)
        return
    job = core.store.unfinished_job(cid)
    target = core.next_galleries.get(cid)
    wanted = row.key_version if row.key_version != current.key_version else (
        job.to_version if job is not None and job.state != DONE else None)
    if wanted is not None and (target is None or target.key_version != wanted):
        key = core.store.collection_key(cid, wanted)
        if key is None:
            return
        target = loading.load_key_version(core, key, row.dimension)
        core.next_galleries[cid] = target
    if row.key_version != current.key_version and target is not None:
        with core.switch_lock:
            core.install_current(cid, target)
        current.retired = True
        core.retire_key_version(cid, current.key_version)
        log.info("replica switched key version", collection_id=cid, key_version=row.key_version)


def _reload_all(core: Core) -> None:
    rows = core.store.collections()
    for cid in set(core.current_galleries) - {row.collection_id for row in rows}:
        _refresh_collection(core, cid)  # deleted while this replica was behind
    for row in rows:
        current = core.current_galleries.pop(row.collection_id, None)
        loading.load_collection(core, row)
        if current is not None:
            current.retired = True
    loading.load_rotations(core)
