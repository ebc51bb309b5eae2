"""The vault's operations, wiring the roles together (the API layer calls only this).

Order inside every state-changing operation: validate, then compute everything that needs
the HSM (indexes, MACs, wrapping), then write in one transaction, then make the change
visible in memory. A failure before the transaction writes nothing; the transaction is
atomic; so no request leaves a partial write behind.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vault import he, logs
from vault.audit import AuditLog
from vault.decider import Decider, SlotRef
from vault.errors import (AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound,
                          ResourceExhausted)
from vault.gallery import CollectionGallery, LiveTemplate, block_digest
from vault.keys import envelope
from vault.keys.hsm import Hsm, HsmConfig
from vault.keys.integrity import Integrity, encode
from vault.protector import MAX_DIMENSION, MIN_DIMENSION, Protector
from vault.store import DELETED, LIVE, BlockRow, CollectionKeyRow, CollectionRow, Store, TemplateRow

log = logs.get("vault.service")

MAX_TOP_K = 100
MAX_SUBJECT_ID_BYTES = 256
MAX_REQUEST_ID_BYTES = 128
_COLLECTION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PII_KEY = "pii"


@dataclass(frozen=True)
class AttemptLimits:
    """After ``max_failures`` failed 1:1 matches in a row (Face ID locks after 5), a subject
    is locked for ``lockout_seconds``: every verification, genuine or not, gets
    RESOURCE_EXHAUSTED until then. A success resets the count."""

    max_failures: int = 5  # 0: no limit (accuracy tests, trusted batch scripts)
    lockout_seconds: float = 300.0


@dataclass(frozen=True)
class CollectionInfo:
    collection_id: str
    dimension: int
    threshold: float
    key_version: int
    template_count: int


@dataclass(frozen=True)
class Candidate:
    subject_id: str = field(repr=False)
    score: float = field(repr=False)


@dataclass(frozen=True)
class MatchResult:
    matched: bool
    candidates: list[Candidate]


# -- validation of request fields ------------------------------------------------------------

def check_collection_id(value: str) -> str:
    if not value:
        raise InvalidArgument("collection_id is empty")
    if not _COLLECTION_ID.fullmatch(value):  # match() with '$' would let 'id\n' through
        raise InvalidArgument(
            "collection_id must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return value


def _check_text_id(value: str, name: str, limit: int, required: bool) -> str:
    if not value:
        if required:
            raise InvalidArgument(f"{name} is empty")
        return value
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > limit:
        raise InvalidArgument(f"{name} is {size} bytes long, at most {limit} are allowed")
    if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidArgument(f"{name} contains control characters or lone surrogates")
    return value


def check_subject_id(value: str) -> str:
    return _check_text_id(value, "subject_id", MAX_SUBJECT_ID_BYTES, required=True)


def check_request_id(value: str) -> str:
    return _check_text_id(value, "request_id", MAX_REQUEST_ID_BYTES, required=False)


def check_threshold(value: float) -> float:
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise InvalidArgument("threshold must be a number in [-1, 1]")
    return float(value)


def check_top_k(value: int) -> int:
    if value == 0:
        return 1
    if not 1 <= value <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be between 1 and {MAX_TOP_K}")
    return value


def check_dimension(value: int) -> int:
    if not MIN_DIMENSION <= value <= MAX_DIMENSION:
        raise InvalidArgument(f"dimension must be between {MIN_DIMENSION} and {MAX_DIMENSION}")
    return value


class Vault:
    """Enroll, match and delete over encrypted templates; keys in the HSM."""

    def __init__(self, store: Store, hsm: Hsm, params: he.HeParams = he.DEFAULT_PARAMS,
                 zero_pool_target: int | None = None, limits: AttemptLimits | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.audit: AuditLog | None = None  # set by open(); see vault.audit
        self.limits = limits or AttemptLimits()
        self._clock = clock
        self._attempts_lock = threading.Lock()
        self.hsm = hsm
        self.params = params
        self.integrity = Integrity(hsm)
        self.protector = Protector(hsm)
        self.decider = Decider()
        self._zero_pool_target = zero_pool_target
        self._galleries: dict[str, CollectionGallery] = {}
        self._damaged: set[str] = set()
        self._create_lock = threading.Lock()
        created = hsm.ensure_keys(create=not store.has_wrapped_keys())
        if created:
            log.info("key ceremony: created keys in the HSM", count=len(created))
        self._pii = envelope.DataKey(self._data_key(_PII_KEY))
        for row in store.collections():
            self._load_collection(row)

    @classmethod
    def open(cls, data_dir: Path, hsm_config: HsmConfig, **kwargs: object) -> Vault:
        """Open (creating if needed) the vault whose database lives in ``data_dir``, with
        its audit log next to it."""
        store = Store(data_dir / "vault.db")
        try:
            vault = cls(store, Hsm(hsm_config), **kwargs)  # type: ignore[arg-type]
        except BaseException:
            store.close()
            raise
        try:
            vault.audit = AuditLog(data_dir / "audit.db", vault.hsm)
        except BaseException:
            vault.close()
            raise
        return vault

    def close(self) -> None:
        for gallery in self._galleries.values():
            gallery.close()
        if self.audit is not None:
            self.audit.close()
        self.store.close()
        self.hsm.close()

    # -- keys ------------------------------------------------------------------------------

    def _data_key(self, name: str, version: int = 1) -> bytes:
        """A data key held wrapped in the store, created on first use."""
        aad = encode("data-key", name, version)
        blob = self.store.wrapped_key(name, version)
        if blob is None:
            key = self.hsm.random(32)
            self.store.put_wrapped_key(name, version, self.hsm.wrap(key, aad))
            return key
        return self.hsm.unwrap(blob, aad)

    # -- loading ---------------------------------------------------------------------------

    def _collection_mac(self, row: CollectionRow) -> bytes:
        return self.integrity.mac("collection", row.collection_id, row.dimension,
                                  float(row.threshold).hex(), row.key_version, row.min_key_version)

    def _load_collection(self, row: CollectionRow) -> None:
        cid = row.collection_id
        if not self.integrity.check(row.mac, "collection", cid, row.dimension,
                                    float(row.threshold).hex(), row.key_version, row.min_key_version):
            self._damaged.add(cid)
            log.error("integrity failure", kind="collection", collection_id=cid)
            return
        key = self.store.collection_key(cid, row.key_version)
        if key is None:
            self._damaged.add(cid)
            log.error("integrity failure", kind="collection_key_missing", collection_id=cid)
            return
        params = he.HeParams.from_json(key.he_params)
        secret = envelope.open_sealed(self.hsm, key.sealed_secret_context,
                                      encode("ckks-secret", cid, row.key_version, key.he_params))
        self.decider.load(cid, row.key_version, secret, params)
        del secret
        gallery = CollectionGallery(cid, row.key_version, row.dimension, params,
                                    key.public_context, self._zero_pool_target)
        bad_blocks: set[int] = set()
        used: dict[int, int] = {}
        for block in self.store.blocks(cid, row.key_version):
            cts = self.store.block_ciphertexts(cid, row.key_version, block.block_no)
            ok = (len(cts) == row.dimension
                  and block_digest(cts) == block.digest
                  and self.integrity.check(block.mac, "block", cid, row.key_version, block.block_no,
                                           block.generation, block.used, block.digest))
            if not ok:
                bad_blocks.add(block.block_no)
                continue
            gallery.load_block(block.block_no, cts, block.generation, block.used)
            used[block.block_no] = block.used
        bad_templates = 0
        seen_slots: set[tuple[int, int]] = set()
        for t in self.store.live_templates(cid, row.key_version):
            place = (t.block_no, t.slot)
            # A slot beyond the block's fill level means an old block state was replayed.
            if (t.block_no in bad_blocks or place in seen_slots
                    or t.slot >= used.get(t.block_no, 0) or not self._template_ok(t)):
                bad_templates += 1
                continue
            seen_slots.add(place)
            gallery.add_live(LiveTemplate(t.template_id, t.subject_hmac, t.block_no, t.slot))
        if bad_blocks or bad_templates:
            log.error("integrity failure", kind="records", collection_id=cid,
                      blocks=len(bad_blocks), count=bad_templates)
        self._galleries[cid] = gallery
        log.info("collection loaded", collection_id=cid, key_version=row.key_version,
                 template_count=gallery.template_count())

    def _template_mac(self, t: TemplateRow, state: int) -> bytes:
        return self.integrity.mac("template", t.collection_id, t.template_id, t.subject_hmac,
                                  t.key_version, t.block_no, t.slot, t.request_hmac, state)

    def _template_ok(self, t: TemplateRow) -> bool:
        return self.integrity.check(t.mac, "template", t.collection_id, t.template_id,
                                    t.subject_hmac, t.key_version, t.block_no, t.slot,
                                    t.request_hmac, t.state)

    def _collection(self, collection_id: str) -> tuple[CollectionRow, CollectionGallery]:
        check_collection_id(collection_id)
        row = self.store.collection(collection_id)
        if row is None:
            raise NotFound("collection not found")
        if collection_id in self._damaged:
            raise DataLoss("collection record failed its integrity check")
        gallery = self._galleries.get(collection_id)
        if gallery is None or gallery.key_version != row.key_version:
            raise DataLoss("collection record does not match the loaded key version")
        if row.key_version < row.min_key_version:
            raise FailedPrecondition("collection key version is below its minimum")
        return row, gallery

    # -- operations ------------------------------------------------------------------------

    def create_collection(self, collection_id: str, dimension: int, threshold: float) -> CollectionInfo:
        """New collection with its own CKKS key pair and transform key version 1."""
        check_collection_id(collection_id)
        check_dimension(dimension)
        threshold = check_threshold(threshold)
        with self._create_lock:
            if self.store.collection(collection_id) is not None:
                raise AlreadyExists("collection already exists")
            secret, public = he.generate(self.params)
            params_json = self.params.to_json()
            sealed = envelope.seal(self.hsm, secret, encode("ckks-secret", collection_id, 1, params_json))
            row = CollectionRow(collection_id, dimension, threshold, 1, 1, b"")
            row = CollectionRow(collection_id, dimension, threshold, 1, 1, self._collection_mac(row))
            self.store.insert_collection(row, CollectionKeyRow(collection_id, 1, params_json, public, sealed))
            self.decider.load(collection_id, 1, secret, self.params)
            del secret
            self._galleries[collection_id] = CollectionGallery(
                collection_id, 1, dimension, self.params, public, self._zero_pool_target)
        log.info("collection created", collection_id=collection_id, dimension=dimension)
        return CollectionInfo(collection_id, dimension, threshold, 1, 0)

    def get_collection(self, collection_id: str) -> CollectionInfo:
        row, gallery = self._collection(collection_id)
        return CollectionInfo(row.collection_id, row.dimension, row.threshold, row.key_version,
                              gallery.template_count())

    def enroll(self, collection_id: str, subject_id: str, embedding: Sequence[float],
               request_id: str = "") -> tuple[str, int]:
        """Store one protected, encrypted template. Returns (template_id, key_version).

        A repeated ``request_id`` returns the first answer and stores nothing new.
        """
        row, gallery = self._collection(collection_id)
        check_subject_id(subject_id)
        check_request_id(request_id)
        template = self.protector.protect(collection_id, row.key_version, row.dimension, embedding)
        subject_hmac = self.integrity.subject_index(collection_id, subject_id)
        request_hmac = self.integrity.request_index(collection_id, request_id) if request_id else None
        with gallery.write_lock:
            if request_hmac is not None:
                previous = self.store.template_by_request(request_hmac)
                if previous is not None:
                    if previous.subject_hmac != subject_hmac:
                        raise AlreadyExists("request_id was already used for another subject")
                    return previous.template_id, previous.key_version
            (write,) = gallery.prepare(template)
            t = TemplateRow(uuid.uuid4().hex, collection_id, subject_hmac, row.key_version,
                            write.block_no, write.slot[0], request_hmac, LIVE, b"")
            t = dataclasses.replace(t, mac=self._template_mac(t, LIVE))
            head = BlockRow(collection_id, row.key_version, write.block_no, write.generation,
                            write.used, write.digest,
                            self.integrity.mac("block", collection_id, row.key_version, write.block_no,
                                               write.generation, write.used, write.digest))
            sealed_subject = self._pii.encrypt(subject_id.encode(),
                                               encode("subject-id", collection_id, subject_hmac))
            self.store.write_enrollment([(head, write.ct_bytes)], [t],
                                        [(collection_id, subject_hmac, sealed_subject)])
            gallery.apply([write], [LiveTemplate(t.template_id, subject_hmac, t.block_no, t.slot)])
        return t.template_id, row.key_version

    def _checked_subject_templates(self, collection_id: str, gallery: CollectionGallery,
                                   subject_hmac: bytes) -> list[TemplateRow]:
        rows = self.store.subject_templates(collection_id, subject_hmac)
        if not rows:
            raise NotFound("subject not found in this collection")
        live = {t.template_id for t in gallery.subject_templates(subject_hmac)}
        for t in rows:
            if not self._template_ok(t) or t.template_id not in live:
                log.error("integrity failure", kind="template", collection_id=collection_id)
                raise DataLoss("a stored template of this subject failed its integrity check")
        return rows

    def verify(self, collection_id: str, subject_id: str, embedding: Sequence[float],
               threshold: float | None = None,
               cancelled: Callable[[], bool] | None = None) -> MatchResult:
        """1:1: does the probe match any template of ``subject_id``?"""
        row, gallery = self._collection(collection_id)
        check_subject_id(subject_id)
        threshold = row.threshold if threshold is None else check_threshold(threshold)
        probe = self.protector.protect(collection_id, row.key_version, row.dimension, embedding)
        subject_hmac = self.integrity.subject_index(collection_id, subject_id)
        rows = self._checked_subject_templates(collection_id, gallery, subject_hmac)
        self._check_not_locked(collection_id, subject_hmac)
        scores = gallery.score(probe, {t.block_no for t in rows}, cancelled)
        slots = [SlotRef(t.block_no, t.slot, 0) for t in rows]
        decided = self.decider.decide(collection_id, row.key_version, scores, slots, threshold, 1)
        self._count_attempt(collection_id, subject_hmac, success=bool(decided))
        if not decided:
            return MatchResult(False, [])
        return MatchResult(True, [Candidate(subject_id, decided[0].score)])

    def _check_not_locked(self, collection_id: str, subject_hmac: bytes) -> None:
        _, locked_until = self.store.verify_attempts(collection_id, subject_hmac)
        wait = locked_until - self._clock()
        if wait > 0:
            raise ResourceExhausted("too many failed verifications for this subject: "
                                    f"locked, retry in {math.ceil(wait)} s")

    def _count_attempt(self, collection_id: str, subject_hmac: bytes, success: bool) -> None:
        """Persisted, so that restarting the server does not reset an attacker's count."""
        with self._attempts_lock:
            failures, _ = self.store.verify_attempts(collection_id, subject_hmac)
            if success:
                if failures:
                    self.store.set_verify_attempts(collection_id, subject_hmac, 0, 0.0)
                return
            failures += 1
            locked_until = 0.0
            if 0 < self.limits.max_failures <= failures:
                failures, locked_until = 0, self._clock() + self.limits.lockout_seconds
                log.warning("subject locked after failed verifications", collection_id=collection_id,
                            count=self.limits.max_failures)
            self.store.set_verify_attempts(collection_id, subject_hmac, failures, locked_until)

    def identify(self, collection_id: str, embedding: Sequence[float], top_k: int = 1,
                 threshold: float | None = None,
                 cancelled: Callable[[], bool] | None = None) -> MatchResult:
        """1:N: the best ``top_k`` subjects whose score reaches the threshold."""
        row, gallery = self._collection(collection_id)
        top_k = check_top_k(top_k)
        threshold = row.threshold if threshold is None else check_threshold(threshold)
        probe = self.protector.protect(collection_id, row.key_version, row.dimension, embedding)
        live = gallery.live_templates()
        if not live:
            return MatchResult(False, [])
        group_of: dict[bytes, int] = {}
        slots = [SlotRef(t.block_no, t.slot, group_of.setdefault(t.subject_hmac, len(group_of)))
                 for t in live]
        subjects = list(group_of)
        scores = gallery.score(probe, {t.block_no for t in live}, cancelled)
        decided = self.decider.decide(collection_id, row.key_version, scores, slots, threshold, top_k)
        candidates = []
        for d in decided:
            subject_hmac = subjects[d.group]
            sealed = self.store.sealed_subject_id(collection_id, subject_hmac)
            if sealed is None:  # deleted between scoring and now
                continue
            subject_id = self._pii.decrypt(sealed, encode("subject-id", collection_id, subject_hmac))
            candidates.append(Candidate(subject_id.decode(), d.score))
        return MatchResult(bool(candidates), candidates)

    def delete_subject(self, collection_id: str, subject_id: str) -> int:
        """Tombstone every template of the subject: none of them matches from now on."""
        _, gallery = self._collection(collection_id)
        check_subject_id(subject_id)
        subject_hmac = self.integrity.subject_index(collection_id, subject_id)
        with gallery.write_lock:
            rows = self.store.subject_templates(collection_id, subject_hmac)
            if not rows:
                raise NotFound("subject not found in this collection")
            macs = {t.template_id: self._template_mac(t, DELETED) for t in rows}
            self.store.mark_deleted(collection_id, subject_hmac, macs)
            gallery.remove_templates(macs)
        return len(rows)
