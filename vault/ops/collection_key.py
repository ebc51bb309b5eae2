"""A collection's key versions: rotation jobs (vault.ops.rotation), minimum version."""

from __future__ import annotations

import dataclasses
import re

from vault import logs
from vault.core import Core, check_revision
from vault.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from vault.domain.records import (
    DONE,
    CollectionRow,
    KeyJobRow,
)
from vault.ops import rotation
from vault.validation import (
    check_collection_id,
)

log = logs.get("vault.ops.collection_key")


def rotate_collection_key(core: Core, collection_id: str) -> KeyJobRow:
    """Start (or resume) moving a collection to a new transform and new CKKS keys."""
    core.require_primary()  # a standby replica changes no gallery state
    return rotation.start(core, collection_id)


def key_job(core: Core, job_id: str) -> KeyJobRow:
    """A key rotation job by its id (INVALID_ARGUMENT, NOT_FOUND)."""
    if not re.fullmatch(r"[0-9a-f]{32}", job_id or ""):
        raise InvalidArgument("job_id must be the 32 hexadecimal digits a rotation returned")
    with core.switch_lock:  # a rotation commits "done" and switches under it: done = served
        job = core.store.key_job(job_id)
    if job is None:
        raise NotFound("key job not found")
    current = core.current_galleries.get(job.collection_id)
    if job.state == DONE and current is not None and current.key_version != job.to_version:
        core.catch_up()  # a standby behind the primary's switch
    return job


def key_versions(core: Core, collection_id: str) -> tuple[CollectionRow, list[int], KeyJobRow | None]:
    """A collection's row, the key versions it holds, and its unfinished rotation."""
    check_collection_id(collection_id)
    row = core.store.collection(collection_id)
    if row is None:
        raise NotFound("collection not found")
    job = core.store.unfinished_job(collection_id)
    return row, core.store.collection_key_versions(collection_id), job


def set_min_key_version(core: Core, collection_id: str, min_key_version: int) -> CollectionRow:
    """Refuse every key version below ``min_key_version`` from now on (it only rises).

    Raising it above the current version while a rotation runs stops the collection
    (FAILED_PRECONDITION) until the rotation switches: a compromised version stops
    serving at once."""
    core.require_primary()  # a standby replica changes no gallery state
    row, _versions, job = key_versions(core, collection_id)
    highest = job.to_version if job is not None else row.key_version
    if not row.min_key_version <= min_key_version <= highest:
        raise FailedPrecondition(
            f"min_key_version must be between {row.min_key_version} (it only rises) and "
            f"{highest} (the newest key version)")
    with core.create_lock:
        stored = core.store.collection(collection_id)
        if stored is None:
            raise NotFound("collection not found")
        core.release_settings(stored)  # a tampered row is DATA_LOSS, never signed afresh
        gallery = core.current_galleries.get(collection_id)
        check_revision(core, stored, gallery)  # and so is an older copy put back
        updated = core.sign(dataclasses.replace(stored, min_key_version=min_key_version,
                                                revision=stored.revision + 1, mac=b""))
        core.store.update_collection(updated)
        if gallery is not None:
            gallery.row_revision = max(gallery.row_revision, updated.revision)
    log.info("minimum key version set", collection_id=collection_id, version=min_key_version)
    return updated
