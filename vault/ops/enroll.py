"""Enroll: one protected, encrypted template into the journal, after a 1:1 check against the subject's templates."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np

from vault import logs
from vault.core import Core
from vault.domain.errors import (
    AlreadyExists,
    PermissionDenied,
    Unavailable,
)
from vault.domain.records import (
    LIVE,
    PAGE,
    CollectionRow,
    PageRow,
    TemplateRow,
)
from vault.gallery import CollectionGallery
from vault.gallery import pages as page_ops
from vault.gallery.pages import Page
from vault.ops import match
from vault.validation import (
    check_request_id,
    check_subject_id,
)

log = logs.get("vault.ops.enroll")


def previous_answer(core: Core, request_hmac: bytes | None, subject_hmac: bytes) -> tuple[str, int] | None:
    """The first answer to a retried request id, if any."""
    if request_hmac is None:
        return None
    previous = core.store.template_by_request(request_hmac)
    if previous is None:
        return None
    if previous.subject_hmac != subject_hmac:
        raise AlreadyExists("request_id was already used for another subject")
    return previous.template_id, previous.key_version


def enroll(core: Core, collection_id: str, subject_id: str, embedding: Sequence[float],
           request_id: str = "", credential: str = "local",
           allow_new_face: bool = False) -> tuple[str, int]:
    """Store one protected, encrypted template in the journal. Returns (template_id,
    key_version). A repeated ``request_id`` returns the first answer, stores nothing.

    A subject that already has templates gets another one only if the new face passes
    1:1 against them (an attempt of ``credential``, counted like a verification), else
    PERMISSION_DENIED and nothing stored; ``allow_new_face`` (the API grants it to
    admins only) skips the check, and is audited."""
    core.require_primary()  # a standby replica changes no gallery state
    for _ in range(3):  # a key rotation may switch versions under us: start again
        done = _enroll(core, collection_id, subject_id, embedding, request_id, credential,
                            allow_new_face)
        if done is not None:
            return done
    raise Unavailable("the collection's key version kept changing; retry")


def _same_face(core: Core, collection_id: str, row: CollectionRow, gallery: CollectionGallery,
               subject_hmac: bytes, template: np.ndarray,
               credential: str) -> list[TemplateRow]:
    """PERMISSION_DENIED unless ``template`` matches one of the subject's templates;
    returns the rows it was checked against."""
    rows, held = match.held_rows(core, collection_id, gallery, subject_hmac)
    if held is None:
        return rows  # deleted meanwhile: a first enrollment again
    reservation = core.attempts.reserve(collection_id, subject_hmac, f"enroll/{credential}")
    try:
        parts = gallery.score_held(template, held)
        matched = bool(core.decider.decide(row, parts, 1))
    except BaseException:
        core.attempts.release(reservation)
        raise
    core.attempts.settle(reservation, success=matched)
    if not matched:
        raise PermissionDenied("subject_id is already enrolled and this face does not match "
                               "its templates: nothing was stored (an admin may enroll a new "
                               "face with allow_new_face)")
    return rows


def _enroll(core: Core, collection_id: str, subject_id: str, embedding: Sequence[float],
            request_id: str, credential: str, allow_new_face: bool) -> tuple[str, int] | None:
    row, gallery = core.current(collection_id)
    subject_id = check_subject_id(subject_id)
    check_request_id(request_id)
    template = core.protect(collection_id, row.key_version, row.dimension, embedding,
                            reference_mean=core.reference_mean(row))
    subject_hmac = core.integrity.subject_index(collection_id, subject_id)
    request_hmac = core.integrity.request_index(collection_id, request_id) if request_id else None
    version = row.key_version
    previous = previous_answer(core, request_hmac, subject_hmac)
    if previous is not None:
        return previous
    existing = core.store.subject_templates(collection_id, subject_hmac, version)
    if existing and not allow_new_face:
        existing = _same_face(core, collection_id, row, gallery, subject_hmac, template,
                                   credential)
    # A journal page (both polynomials at every level, uint64), should a new one be needed.
    core.memory.require(2 * gallery.params.levels * gallery.params.slots * 8, "an enrollment")
    with gallery.write_lock:
        if gallery.retired:
            return None
        previous = previous_answer(core, request_hmac, subject_hmac)
        if previous is not None:
            return previous
        now = core.store.subject_templates(collection_id, subject_hmac, version)
        if {t.template_id for t in now} != {t.template_id for t in existing}:
            return None  # enrolled or deleted meanwhile: check against what is there now
        page_no, slot, page = gallery.next_page_slot()
        ct = page_ops.write(gallery.ctx, page.ct if page is not None else None, slot,
                            template[None, :])
        levels = ct.shape[1]
        page_row = core.sign(PageRow(collection_id, version, page_no,
                                     (page.generation if page else 0) + 1, slot + 1,
                                     page_ops.pack(ct, gallery.ctx.level_moduli(levels)), b""))
        t = core.sign(TemplateRow(uuid.uuid4().hex, collection_id, subject_hmac, version,
                                  PAGE, page_no, slot, request_hmac, LIVE, 0, b""))
        sealed = core.seal_subjects(collection_id, [(subject_hmac, subject_id)])[0]
        core.store.write_templates([page_row], [], [t], [(collection_id, subject_hmac, sealed)])
        groups = (page.groups.copy() if page is not None
                  else np.full(gallery.page_slots, -1, np.int32))
        groups[slot] = gallery.group(subject_hmac)
        gallery.install_page(Page(page_no, page_row.generation, page_row.fill, ct, groups))
    if existing and allow_new_face:
        log.warning("new face enrolled for an existing subject without a 1:1 check",
                    collection_id=collection_id)
        core.event("new_face", collection_id, subject_hmac, "OK allow_new_face",
                    method="Enroll", actor=credential)
    return t.template_id, version
