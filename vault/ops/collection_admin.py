"""Listing collections (AIP-158 pages) and deleting one by crypto-shredding."""

from __future__ import annotations

import base64
import binascii
import contextlib

from vault import logs
from vault.core import Core
from vault.domain.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, VaultError
from vault.domain.model import CollectionInfo
from vault.ops.collections import get_collection_info
from vault.validation import check_collection_id

log = logs.get("vault.ops.collection_admin")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_TOKEN_PREFIX = b"after:"


def _token(last_id: str) -> str:
    return base64.urlsafe_b64encode(_TOKEN_PREFIX + last_id.encode()).decode()


def _after(page_token: str) -> str:
    """The collection id a page token continues after; INVALID_ARGUMENT if it is not one
    this server made."""
    if not page_token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(page_token.encode("ascii"))
        if not raw.startswith(_TOKEN_PREFIX):
            raise ValueError
        return check_collection_id(raw[len(_TOKEN_PREFIX):].decode())
    except (ValueError, binascii.Error, UnicodeError, VaultError):
        raise InvalidArgument("page_token is not a next_page_token of ListCollections") from None


def list_collections(core: Core, page_size: int = 0, page_token: str = ""
                     ) -> tuple[list[CollectionInfo], dict[str, str], str]:
    """One page of collections by id, the damaged ones on it (id -> reason: a record that
    fails its MAC, or a collection stopped as damaged at load; never listed with settings
    as if fine), and the token of the next page ("" on the last). ``page_size`` 0 means
    :data:`DEFAULT_PAGE_SIZE`; above :data:`MAX_PAGE_SIZE` or negative is INVALID_ARGUMENT."""
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be in 0..{MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE})")
    size = page_size or DEFAULT_PAGE_SIZE
    after = _after(page_token)
    ids = [r.collection_id for r in core.store.collections() if r.collection_id > after]
    page: list[CollectionInfo] = []
    damaged: dict[str, str] = {}
    for cid in ids[:size]:
        if cid in core.damage_reasons:
            damaged[cid] = core.damage_reasons[cid]
            continue
        try:
            page.append(get_collection_info(core, cid))
        except NotFound:  # deleted since the ids were read
            continue
        except DataLoss as exc:
            damaged[cid] = exc.message
    return page, damaged, _token(ids[size - 1]) if len(ids) > size else ""


def delete_collection(core: Core, collection_id: str) -> int:
    """Crypto-shred a collection; returns how many templates it held.

    It stops serving first (no Match or Enroll finds it), then its rows (sealed secret
    contexts, public contexts, templates, sealed subject ids, journal pages, blocks,
    live-set and attempt rows, key jobs) go in one transaction, its block files are
    zero-filled and unlinked, and the WAL is truncated. A running key rotation of it is
    FAILED_PRECONDITION (nothing is deleted). The KEK that sealed its secret contexts is
    shared: an old backup opens until the master key is rotated (docs/SECURITY.md)."""
    core.require_primary()  # a standby replica changes no gallery state
    check_collection_id(collection_id)
    with core.create_lock:
        if core.store.collection(collection_id) is None:
            raise NotFound("collection not found")
        job = core.store.unfinished_job(collection_id)
        thread = core.job_threads.get(job.job_id) if job is not None else None
        if (job is not None and job.state == "running") or (thread is not None and thread.is_alive()):
            raise FailedPrecondition("a key rotation of this collection is running: wait until "
                                     "GetKeyJob says it is done, then delete again")
        gallery = core.current_galleries.get(collection_id)
        lock = gallery.write_lock if gallery is not None else contextlib.nullcontext()
        # The write lock: enrolments in flight finish first. The switch lock: row and
        # gallery go together, as core.current reads them (a row without its gallery is
        # DATA_LOSS to a caller racing the deletion).
        with lock, core.switch_lock:
            templates, versions = core.store.delete_collection(collection_id)
            for galleries in (core.current_galleries, core.next_galleries):
                stale = galleries.pop(collection_id, None)
                if stale is not None:  # writers waiting on its lock retry, find nothing
                    stale.retired = True
        for version in versions:
            core.decider.forget(collection_id, version)
            if core.shards is not None:  # crypto-shredding: the shards' copies go too
                core.shards.forget(collection_id, version)
        core.damage_reasons.pop(collection_id, None)
        _erase_files(core, collection_id)
    try:
        core.store.checkpoint_wal()
    except VaultError as exc:  # a reader holds the WAL: maintenance truncates it later
        core.wal_dirty = True
        log.warning("WAL truncation deferred", error_type=type(exc).__name__)
    log.info("collection deleted", collection_id=collection_id, count=templates)
    return templates


def _erase_files(core: Core, collection_id: str) -> None:
    """Zero-fill and unlink every block file of the collection, of any key version."""
    core.files.erase_collection(collection_id)
