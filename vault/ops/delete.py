"""Delete a subject: tombstones at once, values erased from the ciphertexts by maintenance."""

from __future__ import annotations

import dataclasses
import time

from vault import logs
from vault.core import Core
from vault.domain.errors import (
    NotFound,
)
from vault.domain.records import (
    DELETED,
)
from vault.validation import (
    check_subject_id,
)

log = logs.get("vault.ops.delete")


def delete_subject(core: Core, collection_id: str, subject_id: str) -> int:
    """Tombstone every template of the subject: none of them matches from now on; their
    values leave the ciphertexts within ``Tuning.erase_after`` (maintenance)."""
    core.require_primary()  # a standby replica changes no gallery state
    _, gallery = core.current(collection_id, damaged_ok=True)
    subject_id = check_subject_id(subject_id)
    subject_hmac = core.integrity.subject_index(collection_id, subject_id)
    with gallery.write_lock:
        if gallery.retired:
            return delete_subject(core, collection_id, subject_id)
        # Every key version present: a rotation copies rows to its target version.
        rows = core.store.subject_templates(collection_id, subject_hmac)
        if not core.verified_all(rows):
            # A row forged to name this subject is not signed afresh as a tombstone (that
            # would give its place a valid MAC); the genuine ones are deleted all the same.
            core.damage(collection_id, "template", "a stored template failed its integrity "
                        "check: it was not deleted")
            rows = [t for t in rows if core.verified(t)]
        if not any(t.key_version == gallery.key_version for t in rows):
            raise NotFound("subject not found in this collection")
        # A tombstone keeps only where the values sit (for their erasure): nothing
        # links it to the subject or to the request that enrolled it.
        dead = [core.sign(dataclasses.replace(t, subject_hmac=b"", request_hmac=None,
                                              state=DELETED)) for t in rows]
        core.store.mark_deleted(collection_id, subject_hmac, dead)
        now = time.monotonic()
        for t in rows:
            core.deleted_since.setdefault((collection_id, t.key_version, t.tier, t.loc), now)
            holder = core.gallery(collection_id, t.key_version)
            if holder is not None:
                holder.set_live(t.tier, t.loc, t.slot, -1)
    return sum(t.key_version == gallery.key_version for t in rows)
