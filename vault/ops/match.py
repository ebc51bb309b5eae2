"""Match: 1:1 verification and 1:N identification, decided by the decider, released only after the rows' MACs hold."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

import numpy as np

from vault import logs
from vault.core import Core
from vault.crypto import aad
from vault.decider import GroupScore
from vault.domain.errors import (
    DataLoss,
    FailedPrecondition,
    NotFound,
)
from vault.domain.model import Candidate, MatchResult, Observer
from vault.domain.records import (
    BLOCK,
    PAGE,
    CollectionRow,
    TemplateRow,
)
from vault.gallery import CollectionGallery
from vault.gallery.blocks import Block
from vault.gallery.pages import Page
from vault.validation import (
    check_collection_id,
    check_purpose,
    check_subject_id,
    check_threshold,
    check_top_k,
)

# A holder (tier, page or block) and the slots of a subject's templates in it.
Held = tuple[int, Block | Page, np.ndarray]

log = logs.get("vault.ops.match")


def _subject_rows(core: Core, collection_id: str, gallery: CollectionGallery,
                  subject_hmac: bytes) -> list[TemplateRow]:
    """A subject's live template rows, every MAC checked; DATA_LOSS otherwise."""
    rows = core.store.subject_templates(collection_id, subject_hmac, gallery.key_version)
    if not rows:
        raise NotFound("subject not found in this collection")
    _check_rows(core, collection_id, rows)
    return rows


def _check_rows(core: Core, collection_id: str, rows: list[TemplateRow]) -> None:
    """DATA_LOSS unless every row's MAC holds (one token call for all of them)."""
    if not core.verified_all(rows):
        log.error("integrity failure", kind="template", collection_id=collection_id)
        raise DataLoss("a stored template of this subject failed its integrity check")


def held_rows(core: Core, collection_id: str, gallery: CollectionGallery,
          subject_hmac: bytes) -> tuple[list[TemplateRow], list[Held] | None]:
    """A subject's live rows (MACs checked) and the holders they name, as of one moment;
    ([], None) for an unknown subject; DATA_LOSS when rows and memory disagree (on a
    standby replica, once it has caught up with the primary's changes)."""
    for attempt in (0, 1):
        with gallery.write_lock:  # a checkpoint moves templates under this lock
            rows = core.store.subject_templates(collection_id, subject_hmac, gallery.key_version)
            if not rows:
                return rows, None
            _check_rows(core, collection_id, rows)
            held = gallery.resolve([(t.tier, t.loc, t.slot) for t in rows],
                                   gallery.group(subject_hmac))
        if held is not None or attempt or not core.catch_up():
            break
    if held is None:
        log.error("integrity failure", kind="template_place", collection_id=collection_id)
        raise DataLoss("a stored template of this subject failed its integrity check")
    return rows, held


def verify(core: Core, collection_id: str, subject_id: str, embedding: Sequence[float],
           threshold: float | None = None,
           cancelled: Callable[[], bool] | None = None, release_scores: bool = False,
           observe: Observer | None = None, credential: str = "local",
           reveal_unknown: bool = True) -> MatchResult:
    """1:1: does the probe match any template of ``subject_id``, at the collection's
    threshold? (``threshold`` overrides it for in-process callers, e.g. tests; no RPC
    reaches it.) ``release_scores``: the caller was granted scores.

    Each call is an attempt of ``credential`` on the subject, reserved before scoring
    (vault.attempts). An unknown subject is NOT_FOUND only if ``reveal_unknown`` (the
    API: admins); otherwise it is answered as a non-match, attempts and decoy scoring
    included, so that a matcher cannot tell who is enrolled."""
    row, gallery = core.current(collection_id)
    subject_id = check_subject_id(subject_id)
    core.release_settings(row)
    override = None if threshold is None else check_threshold(threshold)
    threshold = row.threshold if override is None else override
    probe = core.protect(collection_id, row.key_version, row.dimension, embedding,
                         reference_mean=core.reference_mean(row))
    if observe is not None:
        observe(probe)
    subject_hmac = core.integrity.subject_index(collection_id, subject_id)
    rows, held = held_rows(core, collection_id, gallery, subject_hmac)
    if not rows and reveal_unknown:
        raise NotFound("subject not found in this collection")
    reservation = core.attempts.reserve(collection_id, subject_hmac, credential)
    try:
        if held is None:
            _decoy(core, row, gallery, probe, cancelled)
            decided: list[GroupScore] = []
        else:
            parts = gallery.score_held(probe, held, cancelled)
            decided = core.decider.decide(row, parts, 1, release_scores, threshold=override)
    except BaseException:
        core.attempts.release(reservation)  # no answer leaves: nothing was learnt
        raise
    core.attempts.settle(reservation, success=bool(decided))
    if not decided:
        return MatchResult(False, [], threshold, release_scores)
    return MatchResult(True, [Candidate(subject_id, decided[0].score, subject_hmac)],
                       threshold, release_scores)


def _decoy(core: Core, row: CollectionRow, gallery: CollectionGallery, probe: np.ndarray,
           cancelled: Callable[[], bool] | None) -> None:
    """Score and decrypt one stored slot and release nothing: an unknown subject costs
    about what a known one does (best effort; not constant time)."""
    pages = list(gallery.pages.values())[:1]
    blocks = list(gallery.blocks.values())[:1]
    held: list[Held] = ([(PAGE, pages[0], np.zeros(1, np.int64))] if pages
            else [(BLOCK, blocks[0], np.zeros(1, np.int64))] if blocks else [])
    if held:
        parts = gallery.score_held(probe, held, cancelled)
        core.decider.decide(row, parts, 1, decoy=True)


def unlock_subject(core: Core, collection_id: str, subject_id: str) -> int:
    """Clear every attempt record of a subject (admin); returns how many credentials
    were locked (or had a damaged record)."""
    check_collection_id(collection_id)
    if core.store.collection(collection_id) is None:
        raise NotFound("collection not found")
    subject_id = check_subject_id(subject_id)
    subject_hmac = core.integrity.subject_index(collection_id, subject_id)
    unlocked = core.attempts.unlock(collection_id, subject_hmac)
    log.info("subject unlocked", collection_id=collection_id, count=unlocked)
    return unlocked


def identify(core: Core, collection_id: str, embedding: Sequence[float], top_k: int = 1,
             threshold: float | None = None,
             cancelled: Callable[[], bool] | None = None, release_scores: bool = False,
             purpose: str = "", observe: Observer | None = None) -> MatchResult:
    """1:N: the best ``top_k`` subjects whose score reaches the collection's threshold
    (``threshold``: in-process override, as for :meth:`verify`). A collection created
    with ``require_purpose`` refuses a search without a ``purpose``."""
    row, gallery = core.current(collection_id)
    top_k = check_top_k(top_k)
    purpose = check_purpose(purpose)
    if not purpose and core.release_settings(row).require_purpose:
        raise FailedPrecondition("this collection requires a purpose (a case reference) "
                                 "on every 1:N identification")
    override = None if threshold is None else check_threshold(threshold)
    threshold = row.threshold if override is None else override
    if gallery.damaged:
        raise DataLoss("a block or journal page of this collection failed its integrity "
                       "check: a 1:N match cannot cover every template")
    probe = core.protect(collection_id, row.key_version, row.dimension, embedding,
                         reference_mean=core.reference_mean(row))
    if observe is not None:
        observe(probe)
    for attempt in (0, 1):
        parts = gallery.score_all(probe, cancelled)
        decided = core.decider.decide(row, parts, top_k, release_scores, threshold=override)
        result = _released(core, collection_id, gallery, decided, threshold, release_scores)
        # A standby may have scored subjects the primary deleted meanwhile (never named:
        # their rows are gone); once it has caught up, the subjects behind them get a turn.
        if attempt or len(result.candidates) == len(decided) or not core.catch_up():
            break
    return result


def _released(core: Core, collection_id: str, gallery: CollectionGallery,
              decided: list[GroupScore], threshold: float, release_scores: bool) -> MatchResult:
    """The decided subjects that may be named. Their template rows are read and their MACs
    checked together, in one token call whatever top_k is (it was one per candidate)."""
    subjects = [gallery.subject(d.group) for d in decided]
    rows = {h: core.store.subject_templates(collection_id, h, gallery.key_version)
            for h in subjects}
    _check_rows(core, collection_id, [t for found in rows.values() for t in found])
    named = [n for n in (_release(core, collection_id, gallery, d, bool(rows[h]))
                         for d, h in zip(decided, subjects, strict=True)) if n]
    # The subject ids, opened by the decider in one call (the PII key is only there).
    ids = core.decider.open_subjects(collection_id, [(h, sealed) for _, h, sealed in named])
    candidates = [Candidate(i, d.score, h) for (d, h, _), i in zip(named, ids, strict=True)]
    return MatchResult(bool(candidates), candidates, threshold, release_scores)


def _release(core: Core, collection_id: str, gallery: CollectionGallery,
             decided: GroupScore, checked: bool) -> tuple[GroupScore, bytes, bytes] | None:
    """The sealed subject id behind a decided group, after checking its rows' MACs (``checked``:
    they were, and were found); a tampered record is never named: DATA_LOSS (logged),
    not a silent non-match."""
    subject_hmac = gallery.subject(decided.group)
    if not checked:
        # Deleted since the scoring, or a key rotation switched versions meanwhile: then
        # the rows are under the current version (the lock waits out a switch).
        with core.switch_lock:
            current = core.current_galleries.get(collection_id)
        if current is None or current is gallery:
            return None
        try:
            _subject_rows(core, collection_id, current, subject_hmac)
        except NotFound:
            return None
    sealed = core.store.sealed_subject_id(collection_id, subject_hmac)
    if sealed is None:
        if not core.store.subject_templates(collection_id, subject_hmac):
            return None  # deleted meanwhile
        log.error("integrity failure", kind="subject_missing", collection_id=collection_id)
        raise DataLoss("the subject record of a matching template is missing: failed its "
                       "integrity check")
    return decided, subject_hmac, sealed


def audit_subject_ref(core: Core, collection_id: str, subject_hmac: bytes, entry_ref: str) -> bytes:
    """What an audit entry records of a subject: an HMAC of the entry's reference under
    a key derived from the subject's sealed id record. Entries of one subject cannot be
    linked without that record and the audit-ref data key (wrapped in the HSM); once
    the subject is deleted its record is gone and no one can link them to it any more.
    Empty when the subject has no record (unknown or already deleted)."""
    sealed = core.store.sealed_subject_id(collection_id, subject_hmac)
    if sealed is None:
        return b""
    key = hmac.new(core.audit_ref_key, aad.audit_subject(collection_id, sealed),
                   hashlib.sha256).digest()
    return hmac.new(key, entry_ref.encode(), hashlib.sha256).digest()[:16]
