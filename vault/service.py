"""The vault's operations, wiring the roles together (the API layer calls only this).

Order inside every state-changing operation: validate, then compute everything that needs
the HSM (indexes, MACs, wrapping) and every ciphertext, then write in one transaction
(block files first, fsynced, named by the rows), then make the change visible in memory.
A failure before the transaction writes nothing; the transaction is atomic; so no request
leaves a partial write behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vault import custody, he, logs
from vault.attempts import AttemptLimits, Attempts
from vault.audit import AuditLog
from vault.block_files import BlockFiles
from vault.decider import Decider, GroupScore
from vault.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from vault.gallery import CollectionGallery, Routing
from vault.gallery import pages as page_ops
from vault.gallery.blocks import Block
from vault.gallery.pages import Page
from vault.gallery.workers import EncryptionPool
from vault.keys import envelope
from vault.keys.hsm import Hsm, HsmConfig
from vault.keys.integrity import Integrity, LiveSet, encode
from vault.protector import Protector, validate_reference_mean
from vault.store import (
    BLOCK,
    DELETED,
    LIVE,
    PAGE,
    BlockRow,
    CollectionKeyRow,
    CollectionRow,
    KeyJobRow,
    PageRow,
    Store,
    TemplateRow,
)
from vault.validation import (
    check_collection_id,
    check_dimension,
    check_purpose,
    check_request_id,
    check_subject_id,
    check_threshold,
    check_top_k,
)

log = logs.get("vault.service")

_PII_KEY = "pii"
_SKETCH_KEY = "sketch"
_AUDIT_REF_KEY = "audit-ref"
_LIVE_SET_KEY = "live-set"


def secret_context_aad(collection_id: str, key_version: int, params_json: str) -> bytes:
    """What a sealed CKKS secret key is bound to: its collection, key version, parameters."""
    return encode("ckks-secret", collection_id, key_version, params_json)


@dataclass(frozen=True)
class Tuning:
    """Knobs of the encrypted gallery (defaults suit the embedded server).

    ``journal_pages``: journal pages that trigger a checkpoint into blocks (bounds the
    pages every 1:N match scores: about 0.5 ms each). ``erase_after``: seconds after a deletion by which
    its values are removed from the ciphertexts (plus one maintenance pass).
    ``maintenance_interval``: seconds between maintenance passes (0: none; tests call
    :meth:`Vault.maintain`). ``workers``: encryption processes (0 or 1: in process).
    """

    routing: Routing = field(default_factory=Routing)
    journal_pages: int = 16
    erase_after: float = 60.0
    maintenance_interval: float = 5.0
    workers: int | None = None
    import_chunk_bytes: int = 1 << 29


@dataclass(frozen=True)
class CollectionPolicy:
    """A collection's release settings, stored as JSON in its row, under its MAC."""

    require_purpose: bool = False

    def to_json(self) -> str:
        return "" if self == CollectionPolicy() else json.dumps(dataclasses.asdict(self),
                                                                 sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CollectionPolicy:
        return cls(**json.loads(text)) if text else cls()


@dataclass(frozen=True)
class CollectionInfo:
    collection_id: str
    dimension: int
    threshold: float
    key_version: int
    template_count: int
    min_key_version: int = 1
    require_purpose: bool = False


@dataclass(frozen=True)
class Candidate:
    subject_id: str = field(repr=False)
    score: float | None = field(repr=False, default=None)  # None unless scores were granted
    subject_hmac: bytes = field(repr=False, default=b"")


@dataclass(frozen=True)
class MatchResult:
    """A decision, the subjects it names, and the threshold it was made at (audited)."""

    matched: bool
    candidates: list[Candidate]
    threshold: float = 0.0
    scores_released: bool = False


# Called with the protected probe before it is scored (vault.api.budget's probing guard).
Observer = Callable[[np.ndarray], None]


class Vault:
    """Enroll, import, match and delete over encrypted templates; keys in the HSM."""

    def __init__(self, store: Store, hsm: Hsm, data_dir: Path,
                 params: he.HeParams = he.DEFAULT_PARAMS, limits: AttemptLimits | None = None,
                 tuning: Tuning | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.audit: AuditLog | None = None  # set by open(); see vault.audit
        self.limits = limits or AttemptLimits()
        self.tuning = tuning or Tuning()
        self.hsm = hsm
        self.params = params
        self.integrity = Integrity(hsm)
        self.attempts = Attempts(store, self.integrity, hsm, self.limits, clock, self._event)
        self.protector = Protector(hsm)
        self.decider = Decider()
        self.files = BlockFiles(data_dir / "blocks")
        self.encryption = EncryptionPool(self.tuning.workers)
        self._galleries: dict[str, CollectionGallery] = {}  # the current key version's
        # Key rotations: the target version's gallery, filled block by block while the
        # current one serves (vault.rotation).
        self.next_galleries: dict[str, CollectionGallery] = {}
        self.jobs_lock = threading.Lock()
        self._keys_lock = threading.Lock()
        self.switch_lock = threading.Lock()
        self.job_threads: dict[str, threading.Thread] = {}
        self.stopping = threading.Event()
        # Collections found damaged at load, with what their RPCs answer (DATA_LOSS).
        self._damaged: dict[str, str] = {}
        self._checked_rows: set[CollectionRow] = set()  # collection rows whose MAC held
        self.integrity_events: list[tuple[str, str, int]] = []
        # (collection, key version, tier, loc) -> monotonic time of its first deletion not
        # yet erased; holders not in it (found at start) are due at once.
        self.deleted_since: dict[tuple[str, int, int, int], float] = {}
        self.wal_dirty = False  # erased bytes may linger in the WAL (vault.maintenance)
        self._create_lock = threading.Lock()
        self._retired: list[tuple[float, Path, bool]] = []
        self._retired_keys: list[tuple[float, str, int]] = []
        self._retired_lock = threading.Lock()
        new = not store.has_wrapped_keys()
        created = hsm.ensure_keys(create=new)
        custody.bind_token(store, hsm, new)  # a different token is refused, not half-used
        if created:
            log.info("key ceremony: created keys in the HSM", count=len(created))
        self._pii = envelope.DataKey(self._data_key(_PII_KEY))
        self._sketch_key = envelope.DataKey(self._data_key(_SKETCH_KEY))
        self._audit_ref_key = self._data_key(_AUDIT_REF_KEY)
        store.live_set = LiveSet(self._data_key(_LIVE_SET_KEY), self.integrity)
        for row in store.collections():
            self._load_collection(row)
        self._load_rotations()
        keep = {self.files.path(c, v, b, g) for c, v, b, g in store.all_block_generations()}
        swept = self.files.sweep(keep)
        if swept:
            log.warning("removed block files no committed row names (interrupted writes)",
                        count=swept)
        self._maintenance: threading.Thread | None = None

    @classmethod
    def open(cls, data_dir: Path, hsm_config: HsmConfig, **kwargs: object) -> Vault:
        """Open (creating if needed) the vault whose database lives in ``data_dir``, with
        its audit log next to it, and start its maintenance thread."""
        store = Store(data_dir / "vault.db")
        try:
            vault = cls(store, Hsm(hsm_config), data_dir, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            store.close()
            raise
        try:
            vault.audit = AuditLog(data_dir / "audit.db", vault.hsm)
            custody.guard_rollback(vault.store, vault.hsm, vault.audit)
            for kind, cid, count in vault.integrity_events:
                vault.audit.append("integrity", uuid.uuid4().hex[:16], "vault", "load", cid, (),
                                   f"DATA_LOSS {kind} count={count}")
        except BaseException:
            vault.close()
            raise
        vault.start_maintenance()
        vault.resume_rotations()
        return vault

    def start_maintenance(self) -> None:
        """Run checkpoints, erasure and file clean-up in the background."""
        if self.tuning.maintenance_interval <= 0 or self._maintenance is not None:
            return
        from vault.maintenance import run_forever
        self._maintenance = threading.Thread(target=run_forever, args=(self, self.stopping),
                                             name="vault-maintenance", daemon=True)
        self._maintenance.start()

    def resume_rotations(self) -> None:
        """Restart the threads of key rotations that were running when the vault stopped."""
        from vault import rotation
        with self.jobs_lock:
            for job in self.store.key_jobs(rotation.RUNNING):
                if job.job_id not in self.job_threads and job.collection_id in self.next_galleries:
                    rotation._launch(self, job)

    def maintain(self, force: bool = False) -> None:
        """One maintenance pass now (``force``: checkpoint and erase whatever is pending)."""
        from vault.maintenance import run_once
        run_once(self, force=force)

    def close(self) -> None:
        self.stopping.set()
        if self._maintenance is not None:
            self._maintenance.join(timeout=60)
        for thread in list(self.job_threads.values()):
            thread.join(timeout=120)
        self.encryption.close()
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

    # -- record MACs -------------------------------------------------------------------------

    def _collection_fields(self, row: CollectionRow) -> tuple:
        return ("collection", row.collection_id, row.dimension, float(row.threshold).hex(),
                row.key_version, row.min_key_version, row.reference_mean, row.policy)

    def _block_fields(self, b: BlockRow) -> tuple:
        return ("block", b.collection_id, b.key_version, b.block_no, b.kind, b.generation,
                b.levels, b.fill, b.digest, b.sketch)

    def _page_fields(self, p: PageRow) -> tuple:
        return ("page", p.collection_id, p.key_version, p.page_no, p.generation, p.fill,
                hashlib.sha256(p.ciphertext).digest())

    def _template_fields(self, t: TemplateRow) -> tuple:
        return ("template", t.collection_id, t.template_id, t.subject_hmac, t.key_version,
                t.tier, t.loc, t.slot, t.request_hmac, t.state, t.erased)

    def _mac_fields(self, row) -> tuple:  # type: ignore[no-untyped-def]
        """What a row's MAC covers, by row type."""
        return {CollectionRow: self._collection_fields, BlockRow: self._block_fields,
                PageRow: self._page_fields, TemplateRow: self._template_fields}[type(row)](row)

    def sign(self, row):  # type: ignore[no-untyped-def]
        """The row with its MAC (computed in the HSM) filled in."""
        return dataclasses.replace(row, mac=self.integrity.mac(*self._mac_fields(row)))

    def verified(self, row) -> bool:  # type: ignore[no-untyped-def]
        return self.integrity.check(row.mac, *self._mac_fields(row))

    def seal_sketch(self, collection_id: str, key_version: int, block_no: int,
                    centroid: np.ndarray) -> bytes:
        return self._sketch_key.encrypt(np.asarray(centroid, np.float32).tobytes(),
                                        encode("sketch", collection_id, key_version, block_no))

    def seal_subject(self, collection_id: str, subject_hmac: bytes, subject_id: str) -> bytes:
        return self._pii.encrypt(subject_id.encode(), encode("subject-id", collection_id, subject_hmac))

    # -- loading ---------------------------------------------------------------------------

    def _event(self, kind: str, collection_id: str, subject_hmac: bytes, outcome: str,
               method: str = "Match", actor: str = "vault") -> None:
        """An audit entry the vault writes on its own (alerts, integrity, admin overrides)."""
        if self.audit is not None:
            self.audit.append(kind, uuid.uuid4().hex[:16], actor, method, collection_id,
                              [subject_hmac], outcome)

    def _integrity_failure(self, kind: str, collection_id: str, count: int = 1) -> None:
        """Log a damaged record found at load; it is audited once the audit log is open."""
        log.error("integrity failure", kind=kind, collection_id=collection_id, count=count)
        self.integrity_events.append((kind, collection_id, count))

    def _damage(self, collection_id: str, kind: str, message: str, count: int = 1) -> None:
        """Stop serving a collection (DATA_LOSS with ``message``) and record why."""
        self._damaged.setdefault(collection_id, message)
        self._integrity_failure(kind, collection_id, count)

    def damaged(self) -> dict[str, str]:
        """Collections that answer DATA_LOSS, with the reason (for health and operators)."""
        return dict(self._damaged)

    def _check_live_set(self, cid: str, version: int) -> None:
        """The stored rows must be the set the collection committed to: a row deleted,
        restored from an older copy or replayed changes their digest."""
        state = self.store.live_set_state(cid, version)
        if state is None or not self.store.live_set.check(state[2], cid, version, *state[:2]):
            self._damage(cid, "live_set_commitment", "collection record failed its integrity "
                         "check: its live-set commitment is missing or forged")
        elif self.store.live_set_digest(cid, version) != state[1]:
            self._damage(cid, "live_set", "collection record failed its integrity check: stored "
                         "templates, pages or blocks were deleted, restored or replayed")
        missing = self.store.subjects_missing(cid, version)
        if missing:
            self._damage(cid, "subject_missing", "collection record failed its integrity check: "
                         "subject records of live templates are missing", missing)

    def _load_collection(self, row: CollectionRow) -> None:
        cid = row.collection_id
        if not self.verified(row):
            self._damage(cid, "collection", "collection record failed its integrity check")
            return
        rotating = {j.to_version for j in self.store.key_jobs()
                    if j.collection_id == cid and j.state != "done"}
        newest = self.store.newest_key_version(cid)
        if newest > row.key_version and newest not in rotating:
            # A valid but old collection row behind newer data: a replayed record (a
            # rollback to before a key rotation, say).
            self._damage(cid, "collection_replayed", "collection record failed its integrity "
                         "check: it is older than the data it names")
            return
        stale = self.store.count_below(cid, row.min_key_version)
        if stale:
            self._integrity_failure("below_min_key_version", cid, stale)
        key = self.store.collection_key(cid, row.key_version)
        if key is None:
            self._damage(cid, "collection_key_missing", "collection record failed its integrity "
                         "check: its key version is missing")
            return
        self._galleries[cid] = self._load_key_version(key, row.dimension)

    def _load_key_version(self, key: CollectionKeyRow, dimension: int) -> CollectionGallery:
        """A stored key version: its secret key unsealed into the decider, its gallery loaded."""
        cid, version = key.collection_id, key.key_version
        params = he.HeParams.from_json(key.he_params)
        secret = envelope.open_sealed(self.hsm, key.sealed_secret_context,
                                      secret_context_aad(cid, version, key.he_params))
        self.decider.load(cid, version, secret, params)
        del secret
        gallery = CollectionGallery(cid, version, dimension, params, key.public_context,
                                    self.tuning.routing)
        bad = self._load_blocks(gallery) + self._load_pages(gallery)
        gallery.reserve_page_numbers(self.store.max_loc(cid, version, PAGE) + 1)
        gallery.reserve_block_numbers(self.store.max_loc(cid, version, BLOCK) + 1)
        bad_templates = self._load_templates(gallery)
        if bad or bad_templates:
            # A 1:N over a missing holder would be a silent non-match: DATA_LOSS instead.
            gallery.damaged = True
            self._integrity_failure("records", cid, bad + bad_templates)
        self._check_live_set(cid, version)
        log.info("collection loaded", collection_id=cid, key_version=version,
                 template_count=gallery.template_count(), blocks_total=len(gallery.blocks))
        return gallery

    def _load_rotations(self) -> None:
        """The target versions of unfinished key rotations, as far as they got."""
        for job in self.store.key_jobs():
            current = self._galleries.get(job.collection_id)
            if job.state == "done" or current is None or current.key_version != job.from_version:
                continue
            key = self.store.collection_key(job.collection_id, job.to_version)
            if key is None:
                continue
            self.next_galleries[job.collection_id] = self._load_key_version(key, current.dimension)

    def gallery(self, collection_id: str, key_version: int) -> CollectionGallery | None:
        """The gallery of a key version: the current one or a rotation's target."""
        for found in (self._galleries.get(collection_id), self.next_galleries.get(collection_id)):
            if found is not None and found.key_version == key_version:
                return found
        return None

    def install_current(self, collection_id: str, gallery: CollectionGallery) -> None:
        """A key rotation's switch: its target version serves from now on."""
        self._galleries[collection_id] = gallery
        self.next_galleries.pop(collection_id, None)

    def retire_key_version(self, collection_id: str, key_version: int) -> None:
        """Forget a replaced version's keys once matches in flight are done with them."""
        with self._retired_lock:
            self._retired_keys.append((time.monotonic(), collection_id, key_version))

    def _load_blocks(self, gallery: CollectionGallery) -> int:
        """Install every block whose row MAC and file digest agree; returns the bad ones."""
        cid, version = gallery.collection_id, gallery.key_version
        rows = self.store.blocks(cid, version)

        def read(b: BlockRow) -> tuple[np.ndarray, bytes] | None:
            try:  # hashing and file reads release the GIL: several at once
                residues, digest = BlockFiles.read(
                    self.files.path(cid, version, b.block_no, b.generation), levels=1)
            except (OSError, ValueError):
                return None
            return residues[0], digest

        with ThreadPoolExecutor(max_workers=4) as pool:
            loaded = list(pool.map(read, rows))
        bad = 0
        for b, found in zip(rows, loaded):
            if (found is None or found[1] != b.digest or not self.verified(b)
                    or found[0].shape != (gallery.dimension, 2, gallery.params.slots)):
                bad += 1
                continue
            centroid = None
            if b.sketch is not None:
                raw = self._sketch_key.decrypt(b.sketch, encode("sketch", cid, version, b.block_no))
                centroid = np.frombuffer(raw, np.float32).copy()
            gallery.install_block(Block(b.block_no, b.kind, b.generation, b.fill, b.levels,
                                        found[0], b.digest,
                                        np.full(gallery.params.slots, -1, np.int32), centroid))
        return bad

    def read_block(self, gallery: CollectionGallery, block: Block) -> np.ndarray:
        """Every prime of a block, (D, 2, levels, N), read from its file and checked."""
        path = self.files.path(gallery.collection_id, gallery.key_version, block.block_no,
                               block.generation)
        try:
            residues, digest = BlockFiles.read(path)
        except (OSError, ValueError) as exc:
            raise DataLoss("a block file is missing or unreadable") from exc
        if digest != block.digest:
            log.error("integrity failure", kind="block_file", collection_id=gallery.collection_id)
            raise DataLoss("a block file changed on disk")
        return np.stack(residues, axis=2)

    def _load_pages(self, gallery: CollectionGallery) -> int:
        bad = 0
        for p in self.store.pages(gallery.collection_id, gallery.key_version):
            if not self.verified(p):
                bad += 1
                continue
            try:
                levels = page_ops.packed_levels(p.ciphertext, gallery.params.slots, gallery.ctx.moduli)
                ct = page_ops.unpack(p.ciphertext, levels, gallery.params.slots, gallery.ctx.moduli)
            except ValueError:
                bad += 1
                continue
            gallery.install_page(Page(p.page_no, p.generation, p.fill, ct,
                                      np.full(gallery.page_slots, -1, np.int32)))
        return bad

    def _load_templates(self, gallery: CollectionGallery) -> int:
        """Mark live slots. A template whose holder is missing or damaged, whose slot is
        beyond its holder's fill (an old holder state replayed), or that shares its slot
        with another (a swapped place) never matches. MACs of template rows are checked
        where it matters, before anything about a subject is released."""
        seen: set[tuple[int, int, int]] = set()
        bad = 0
        for subject_hmac, tier, loc, slot in self.store.live_places(gallery.collection_id,
                                                                     gallery.key_version):
            holder = gallery.holder(tier, loc)
            place = (tier, loc, slot)
            if holder is None or not 0 <= slot < holder.fill or place in seen:
                bad += 1
                if place in seen:
                    gallery.set_live(tier, loc, slot, -1)
                continue
            seen.add(place)
            gallery.set_live(tier, loc, slot, gallery.group(subject_hmac))
        return bad

    def _collection(self, collection_id: str,
                    damaged_ok: bool = False) -> tuple[CollectionRow, CollectionGallery]:
        """The collection's row and current gallery; ``damaged_ok``: also when its stored
        rows failed their live-set check (a deletion must still be possible)."""
        check_collection_id(collection_id)
        with self.switch_lock:  # the row and the gallery, both before or both after a switch
            row = self.store.collection(collection_id)
            gallery = self._galleries.get(collection_id)
        if row is None:
            raise NotFound("collection not found")
        if collection_id in self._damaged and not (damaged_ok and gallery is not None):
            raise DataLoss(self._damaged[collection_id])
        if gallery is None or gallery.key_version != row.key_version:
            raise DataLoss("collection record does not match the loaded key version")
        if row.key_version < row.min_key_version:
            raise FailedPrecondition("collection key version is below its minimum")
        if not damaged_ok:  # threshold, policy, reference mean: as signed, on every path
            self._release_settings(row)
        return row, gallery

    def has_collection(self, collection_id: str) -> bool:
        """True when the collection is loaded (no store read)."""
        return collection_id in self._galleries

    def _release_settings(self, row: CollectionRow) -> CollectionPolicy:
        """The collection's threshold and policy are what the decider applies: the row read
        for this match must carry its MAC (a row edited under a running server would
        otherwise lower the threshold or drop the purpose requirement). One HSM MAC per
        distinct row state, not per match."""
        if row not in self._checked_rows:
            if not self.verified(row):
                log.error("integrity failure", kind="collection", collection_id=row.collection_id)
                raise DataLoss("collection record failed its integrity check")
            if len(self._checked_rows) > 1024:
                self._checked_rows.clear()
            self._checked_rows.add(row)
        return CollectionPolicy.from_json(row.policy)

    def galleries(self) -> list[CollectionGallery]:
        return list(self._galleries.values())

    def retire(self, path: Path, erase: bool) -> None:
        """Remove a replaced block file after a grace period (matches in flight may still
        read its mapping); ``erase``: zero-fill it first (it held erased values)."""
        with self._retired_lock:
            self._retired.append((time.monotonic(), path, erase))

    def sweep_retired(self, grace: float, everything: bool = False,
                      key_grace: float | None = None) -> None:
        """Remove retired block files older than ``grace`` seconds and forget retired key
        versions older than ``key_grace`` (default: ``grace``)."""
        now = time.monotonic()
        key_grace = grace if key_grace is None else key_grace
        with self._retired_lock:
            due = [r for r in self._retired if everything or now - r[0] >= grace]
            self._retired = [r for r in self._retired if r not in due]
        for _, path, erase in due:
            BlockFiles.remove(path, erase=erase)
        with self._retired_lock:
            keys = [r for r in self._retired_keys if everything or now - r[0] >= key_grace]
            self._retired_keys = [r for r in self._retired_keys if r not in keys]
        for _, cid, version in keys:
            self.decider.forget(cid, version)
            self.protector.forget(cid, version)

    # -- operations ------------------------------------------------------------------------

    def create_collection(self, collection_id: str, dimension: int, threshold: float | None,
                          reference_mean: Sequence[float] = (),
                          require_purpose: bool = False) -> CollectionInfo:
        """New collection with its own CKKS key pair and transform key version 1.

        ``threshold`` is required (None: INVALID_ARGUMENT). ``reference_mean``: the
        embedding model's public population mean of normalised embeddings; every embedding
        is centred on it (vault.protector, wolves), so the threshold applies to the cosine
        of centred embeddings. Without one the collection is exposed to wolves.
        ``require_purpose``: every 1:N identification must give a purpose."""
        check_collection_id(collection_id)
        check_dimension(dimension)
        if threshold is None:
            raise InvalidArgument("threshold is required: the decision threshold on cosine "
                                  "similarity, in [-1, 1]")
        threshold = check_threshold(threshold)
        mean = validate_reference_mean(reference_mean, dimension)
        mean_bytes = None if mean is None else mean.astype("<f8").tobytes()
        with self._create_lock:
            if self.store.collection(collection_id) is not None:
                raise AlreadyExists("collection already exists")
            secret, public = he.generate(self.params)
            params_json = self.params.to_json()
            sealed = envelope.seal(self.hsm, secret, secret_context_aad(collection_id, 1, params_json))
            policy = CollectionPolicy(require_purpose=bool(require_purpose))
            row = self.sign(CollectionRow(collection_id, dimension, threshold, 1, 1, b"",
                                          mean_bytes, policy.to_json()))
            gallery = CollectionGallery(collection_id, 1, dimension, self.params, public,
                                        self.tuning.routing)
            self.store.insert_collection(row, CollectionKeyRow(collection_id, 1, params_json,
                                                               public, sealed))
            self.decider.load(collection_id, 1, secret, self.params)
            del secret
            self._galleries[collection_id] = gallery
        log.info("collection created", collection_id=collection_id, dimension=dimension,
                 status="centred" if mean is not None else "no_reference_mean")
        return CollectionInfo(collection_id, dimension, threshold, 1, 0, 1, policy.require_purpose)

    @staticmethod
    def reference_mean(row: CollectionRow) -> np.ndarray | None:
        """A collection's reference mean (vault.protector), or None."""
        if row.reference_mean is None:
            return None
        return np.frombuffer(row.reference_mean, "<f8")

    def get_collection(self, collection_id: str) -> CollectionInfo:
        row, gallery = self._collection(collection_id)
        return CollectionInfo(row.collection_id, row.dimension, row.threshold, row.key_version,
                              gallery.template_count(), row.min_key_version,
                              CollectionPolicy.from_json(row.policy).require_purpose)

    def get_collection_info(self, collection_id: str) -> CollectionInfo:
        """As :meth:`get_collection`, also for a collection stopped by its minimum key
        version (what the key administrator needs to see)."""
        row, _versions, _job = self.key_versions(collection_id)
        gallery = self._galleries.get(collection_id)
        count = gallery.template_count() if gallery is not None else 0
        return CollectionInfo(row.collection_id, row.dimension, row.threshold, row.key_version,
                              count, row.min_key_version,
                              CollectionPolicy.from_json(row.policy).require_purpose)

    def _previous(self, request_hmac: bytes | None, subject_hmac: bytes) -> tuple[str, int] | None:
        """The first answer to a retried request id, if any."""
        if request_hmac is None:
            return None
        previous = self.store.template_by_request(request_hmac)
        if previous is None:
            return None
        if previous.subject_hmac != subject_hmac:
            raise AlreadyExists("request_id was already used for another subject")
        return previous.template_id, previous.key_version

    def enroll(self, collection_id: str, subject_id: str, embedding: Sequence[float],
               request_id: str = "", credential: str = "local",
               allow_new_face: bool = False) -> tuple[str, int]:
        """Store one protected, encrypted template in the journal. Returns (template_id,
        key_version). A repeated ``request_id`` returns the first answer, stores nothing.

        A subject that already has templates gets another one only if the new face passes
        1:1 against them (an attempt of ``credential``, counted like a verification), else
        PERMISSION_DENIED and nothing stored; ``allow_new_face`` (the API grants it to
        admins only) skips the check, and is audited."""
        for _ in range(3):  # a key rotation may switch versions under us: start again
            done = self._enroll(collection_id, subject_id, embedding, request_id, credential,
                                allow_new_face)
            if done is not None:
                return done
        raise Unavailable("the collection's key version kept changing; retry")

    def _same_face(self, collection_id: str, row: CollectionRow, gallery: CollectionGallery,
                   subject_hmac: bytes, template: np.ndarray,
                   credential: str) -> list[TemplateRow]:
        """PERMISSION_DENIED unless ``template`` matches one of the subject's templates;
        returns the rows it was checked against."""
        rows, held = self._held(collection_id, gallery, subject_hmac)
        if held is None:
            return rows  # deleted meanwhile: a first enrollment again
        reservation = self.attempts.reserve(collection_id, subject_hmac, f"enroll/{credential}")
        try:
            parts = gallery.score_held(template, held)
            matched = bool(self.decider.decide(collection_id, row.key_version, parts,
                                               row.threshold, 1))
        except BaseException:
            self.attempts.release(reservation)
            raise
        self.attempts.settle(reservation, success=matched)
        if not matched:
            raise PermissionDenied("subject_id is already enrolled and this face does not match "
                                   "its templates: nothing was stored (an admin may enroll a new "
                                   "face with allow_new_face)")
        return rows

    def _enroll(self, collection_id: str, subject_id: str, embedding: Sequence[float],
                request_id: str, credential: str, allow_new_face: bool) -> tuple[str, int] | None:
        row, gallery = self._collection(collection_id)
        subject_id = check_subject_id(subject_id)
        check_request_id(request_id)
        template = self.protector.protect(collection_id, row.key_version, row.dimension, embedding,
                                          reference_mean=self.reference_mean(row))
        subject_hmac = self.integrity.subject_index(collection_id, subject_id)
        request_hmac = self.integrity.request_index(collection_id, request_id) if request_id else None
        version = row.key_version
        previous = self._previous(request_hmac, subject_hmac)
        if previous is not None:
            return previous
        existing = self.store.subject_templates(collection_id, subject_hmac, version)
        if existing and not allow_new_face:
            existing = self._same_face(collection_id, row, gallery, subject_hmac, template,
                                       credential)
        with gallery.write_lock:
            if gallery.retired:
                return None
            previous = self._previous(request_hmac, subject_hmac)
            if previous is not None:
                return previous
            now = self.store.subject_templates(collection_id, subject_hmac, version)
            if {t.template_id for t in now} != {t.template_id for t in existing}:
                return None  # enrolled or deleted meanwhile: check against what is there now
            page_no, slot, page = gallery.next_page_slot()
            ct = page_ops.write(gallery.ctx, page.ct if page is not None else None, slot,
                                template[None, :])
            levels = ct.shape[1]
            page_row = self.sign(PageRow(collection_id, version, page_no,
                                         (page.generation if page else 0) + 1, slot + 1,
                                         page_ops.pack(ct, gallery.ctx.level_moduli(levels)), b""))
            t = self.sign(TemplateRow(uuid.uuid4().hex, collection_id, subject_hmac, version,
                                      PAGE, page_no, slot, request_hmac, LIVE, 0, b""))
            sealed = self.seal_subject(collection_id, subject_hmac, subject_id)
            self.store.write_templates([page_row], [], [t], [(collection_id, subject_hmac, sealed)])
            groups = (page.groups.copy() if page is not None
                      else np.full(gallery.page_slots, -1, np.int32))
            groups[slot] = gallery.group(subject_hmac)
            gallery.install_page(Page(page_no, page_row.generation, page_row.fill, ct, groups))
        if existing and allow_new_face:
            log.warning("new face enrolled for an existing subject without a 1:1 check",
                        collection_id=collection_id)
            self._event("new_face", collection_id, subject_hmac, "OK allow_new_face",
                        method="Enroll", actor=credential)
        return t.template_id, version

    def _subject_rows(self, collection_id: str, gallery: CollectionGallery,
                      subject_hmac: bytes) -> list[TemplateRow]:
        """A subject's live template rows, every MAC checked; DATA_LOSS otherwise."""
        rows = self.store.subject_templates(collection_id, subject_hmac, gallery.key_version)
        if not rows:
            raise NotFound("subject not found in this collection")
        self._check_rows(collection_id, rows)
        return rows

    def _check_rows(self, collection_id: str, rows: list[TemplateRow]) -> None:
        for t in rows:
            if not self.verified(t):
                log.error("integrity failure", kind="template", collection_id=collection_id)
                raise DataLoss("a stored template of this subject failed its integrity check")

    def _held(self, collection_id: str, gallery: CollectionGallery,
              subject_hmac: bytes) -> tuple[list[TemplateRow], list | None]:
        """A subject's live rows (MACs checked) and the holders they name, as of one moment;
        ([], None) for an unknown subject; DATA_LOSS when rows and memory disagree."""
        with gallery.write_lock:  # a checkpoint moves templates under this lock
            rows = self.store.subject_templates(collection_id, subject_hmac, gallery.key_version)
            if not rows:
                return rows, None
            self._check_rows(collection_id, rows)
            held = gallery.resolve([(t.tier, t.loc, t.slot) for t in rows],
                                   gallery.group(subject_hmac))
        if held is None:
            log.error("integrity failure", kind="template_place", collection_id=collection_id)
            raise DataLoss("a stored template of this subject failed its integrity check")
        return rows, held

    def verify(self, collection_id: str, subject_id: str, embedding: Sequence[float],
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
        row, gallery = self._collection(collection_id)
        subject_id = check_subject_id(subject_id)
        self._release_settings(row)
        threshold = row.threshold if threshold is None else check_threshold(threshold)
        probe = self.protector.protect(collection_id, row.key_version, row.dimension, embedding,
                                       reference_mean=self.reference_mean(row))
        if observe is not None:
            observe(probe)
        subject_hmac = self.integrity.subject_index(collection_id, subject_id)
        rows, held = self._held(collection_id, gallery, subject_hmac)
        if not rows and reveal_unknown:
            raise NotFound("subject not found in this collection")
        reservation = self.attempts.reserve(collection_id, subject_hmac, credential)
        try:
            if held is None:
                self._decoy(gallery, probe, cancelled)
                decided: list[GroupScore] = []
            else:
                parts = gallery.score_held(probe, held, cancelled)
                decided = self.decider.decide(collection_id, row.key_version, parts, threshold, 1,
                                              release_scores)
        except BaseException:
            self.attempts.release(reservation)  # no answer leaves: nothing was learnt
            raise
        self.attempts.settle(reservation, success=bool(decided))
        if not decided:
            return MatchResult(False, [], threshold, release_scores)
        return MatchResult(True, [Candidate(subject_id, decided[0].score, subject_hmac)],
                           threshold, release_scores)

    def _decoy(self, gallery: CollectionGallery, probe: np.ndarray,
               cancelled: Callable[[], bool] | None) -> None:
        """Score and decrypt one stored slot and release nothing: an unknown subject costs
        about what a known one does (best effort; not constant time)."""
        pages = list(gallery.pages.values())[:1]
        blocks = list(gallery.blocks.values())[:1]
        held = ([(PAGE, pages[0], np.zeros(1, np.int64))] if pages
                else [(BLOCK, blocks[0], np.zeros(1, np.int64))] if blocks else [])
        if held:
            parts = gallery.score_held(probe, held, cancelled)
            self.decider.decide(gallery.collection_id, gallery.key_version, parts, 2.0, 1)

    def unlock_subject(self, collection_id: str, subject_id: str) -> int:
        """Clear every attempt record of a subject (admin); returns how many credentials
        were locked (or had a damaged record)."""
        check_collection_id(collection_id)
        if self.store.collection(collection_id) is None:
            raise NotFound("collection not found")
        subject_id = check_subject_id(subject_id)
        subject_hmac = self.integrity.subject_index(collection_id, subject_id)
        unlocked = self.attempts.unlock(collection_id, subject_hmac)
        log.info("subject unlocked", collection_id=collection_id, count=unlocked)
        return unlocked

    def identify(self, collection_id: str, embedding: Sequence[float], top_k: int = 1,
                 threshold: float | None = None,
                 cancelled: Callable[[], bool] | None = None, release_scores: bool = False,
                 purpose: str = "", observe: Observer | None = None) -> MatchResult:
        """1:N: the best ``top_k`` subjects whose score reaches the collection's threshold
        (``threshold``: in-process override, as for :meth:`verify`). A collection created
        with ``require_purpose`` refuses a search without a ``purpose``."""
        row, gallery = self._collection(collection_id)
        top_k = check_top_k(top_k)
        purpose = check_purpose(purpose)
        if not purpose and self._release_settings(row).require_purpose:
            raise FailedPrecondition("this collection requires a purpose (a case reference) "
                                     "on every 1:N identification")
        threshold = row.threshold if threshold is None else check_threshold(threshold)
        if gallery.damaged:
            raise DataLoss("a block or journal page of this collection failed its integrity "
                           "check: a 1:N match cannot cover every template")
        probe = self.protector.protect(collection_id, row.key_version, row.dimension, embedding,
                                       reference_mean=self.reference_mean(row))
        if observe is not None:
            observe(probe)
        parts = gallery.score_all(probe, cancelled)
        decided = self.decider.decide(collection_id, row.key_version, parts, threshold, top_k,
                                      release_scores)
        candidates = [c for c in (self._release(collection_id, gallery, d) for d in decided) if c]
        return MatchResult(bool(candidates), candidates, threshold, release_scores)

    def _release(self, collection_id: str, gallery: CollectionGallery,
                 decided: GroupScore) -> Candidate | None:
        """The subject id behind a decided group, after checking its rows' MACs; a
        tampered record is never named: DATA_LOSS (logged), not a silent non-match."""
        subject_hmac = gallery.subject(decided.group)
        try:
            try:
                self._subject_rows(collection_id, gallery, subject_hmac)
            except NotFound:
                # Deleted since the scoring, or a key rotation switched versions meanwhile:
                # then the rows are under the current version (the lock waits out a switch).
                with self.switch_lock:
                    current = self._galleries.get(collection_id)
                if current is None or current is gallery:
                    return None
                self._subject_rows(collection_id, current, subject_hmac)
        except NotFound:
            return None
        sealed = self.store.sealed_subject_id(collection_id, subject_hmac)
        if sealed is None:
            if not self.store.subject_templates(collection_id, subject_hmac):
                return None  # deleted meanwhile
            log.error("integrity failure", kind="subject_missing", collection_id=collection_id)
            raise DataLoss("the subject record of a matching template is missing: failed its "
                           "integrity check")
        subject_id = self._pii.decrypt(sealed, encode("subject-id", collection_id, subject_hmac))
        return Candidate(subject_id.decode(), decided.score, subject_hmac)

    def audit_subject_ref(self, collection_id: str, subject_hmac: bytes, entry_ref: str) -> bytes:
        """What an audit entry records of a subject: an HMAC of the entry's reference under
        a key derived from the subject's sealed id record. Entries of one subject cannot be
        linked without that record and the audit-ref data key (wrapped in the HSM); once
        the subject is deleted its record is gone and no one can link them to it any more.
        Empty when the subject has no record (unknown or already deleted)."""
        sealed = self.store.sealed_subject_id(collection_id, subject_hmac)
        if sealed is None:
            return b""
        key = hmac.new(self._audit_ref_key, encode("audit-subject", collection_id, sealed),
                       hashlib.sha256).digest()
        return hmac.new(key, entry_ref.encode(), hashlib.sha256).digest()[:16]

    def delete_subject(self, collection_id: str, subject_id: str) -> int:
        """Tombstone every template of the subject: none of them matches from now on; their
        values leave the ciphertexts within ``Tuning.erase_after`` (maintenance)."""
        _, gallery = self._collection(collection_id, damaged_ok=True)
        subject_id = check_subject_id(subject_id)
        subject_hmac = self.integrity.subject_index(collection_id, subject_id)
        with gallery.write_lock:
            if gallery.retired:
                return self.delete_subject(collection_id, subject_id)
            # Every key version present: a rotation copies rows to its target version.
            rows = self.store.subject_templates(collection_id, subject_hmac)
            if not any(t.key_version == gallery.key_version for t in rows):
                raise NotFound("subject not found in this collection")
            # A tombstone keeps only where the values sit (for their erasure): nothing
            # links it to the subject or to the request that enrolled it.
            dead = [self.sign(dataclasses.replace(t, subject_hmac=b"", request_hmac=None,
                                                  state=DELETED)) for t in rows]
            self.store.mark_deleted(collection_id, subject_hmac, dead)
            now = time.monotonic()
            for t in rows:
                self.deleted_since.setdefault((collection_id, t.key_version, t.tier, t.loc), now)
                holder = self.gallery(collection_id, t.key_version)
                if holder is not None:
                    holder.set_live(t.tier, t.loc, t.slot, -1)
        return sum(t.key_version == gallery.key_version for t in rows)

    # -- key lifecycle -----------------------------------------------------------------------

    def rotate_master_key(self) -> tuple[int, int, list[int]]:
        """A new KEK version; everything wrapped is rewrapped under it; old versions that
        nothing refers to any more are destroyed in the token. No template is decrypted:
        only data keys pass through. Returns (version, rewrapped, destroyed versions)."""
        with self._keys_lock:
            version = self.hsm.create_kek()
            log.info("master key version created", version=version)
            _, rewrapped, destroyed = self._rewrap()
        return version, rewrapped, destroyed

    def rewrap_keys(self) -> tuple[int, int, list[int]]:
        """Rewrap whatever is not under the current KEK version and destroy unreferenced old
        versions (finishes a master key rotation that was interrupted)."""
        with self._keys_lock:
            return self._rewrap()

    def _rewrap(self) -> tuple[int, int, list[int]]:
        current = self.hsm.current_kek_version()
        changed = []
        for kind, key, blob in self.store.wrapped_blobs():
            aad = encode(kind, *key)
            if kind == "data-key" and self.hsm.wrapped_version(blob) != current:
                changed.append((kind, key, self.hsm.rewrap(blob, aad, current)))
            elif kind != "data-key" and envelope.sealed_kek_version(blob) != current:
                changed.append((kind, key, envelope.rewrap_sealed(self.hsm, blob, aad, current)))
        self.store.replace_wrapped_blobs(changed)
        # Everything this vault wraps is now under the current version (one token serves
        # one vault): the older versions protect nothing and go.
        destroyed = [v for v in self.hsm.versions("kek") if v != current]
        for version in destroyed:
            self.hsm.destroy_kek(version)
        log.info("keys rewrapped", version=current, count=len(changed), status=f"destroyed={destroyed}")
        return current, len(changed), destroyed

    def master_key_versions(self) -> tuple[list[int], int]:
        """KEK versions present in the token, and the current one."""
        return self.hsm.versions("kek"), self.hsm.current_kek_version()

    def rotate_collection_key(self, collection_id: str) -> KeyJobRow:
        """Start (or resume) moving a collection to a new transform and new CKKS keys."""
        from vault import rotation
        return rotation.start(self, collection_id)

    def key_job(self, job_id: str) -> KeyJobRow:
        if not re.fullmatch(r"[0-9a-f]{32}", job_id or ""):
            raise InvalidArgument("job_id must be the 32 hexadecimal digits a rotation returned")
        job = self.store.key_job(job_id)
        if job is None:
            raise NotFound("key job not found")
        return job

    def key_versions(self, collection_id: str) -> tuple[CollectionRow, list[int], KeyJobRow | None]:
        """A collection's row, the key versions it holds, and its unfinished rotation."""
        check_collection_id(collection_id)
        row = self.store.collection(collection_id)
        if row is None:
            raise NotFound("collection not found")
        job = next((j for j in reversed(self.store.key_jobs())
                    if j.collection_id == collection_id and j.state != "done"), None)
        return row, self.store.collection_key_versions(collection_id), job

    def set_min_key_version(self, collection_id: str, min_key_version: int) -> CollectionRow:
        """Refuse every key version below ``min_key_version`` from now on (it only rises).

        Raising it above the current version while a rotation runs stops the collection
        (FAILED_PRECONDITION) until the rotation switches: a compromised version stops
        serving at once."""
        row, versions, job = self.key_versions(collection_id)
        highest = job.to_version if job is not None else row.key_version
        if not row.min_key_version <= min_key_version <= highest:
            raise FailedPrecondition(
                f"min_key_version must be between {row.min_key_version} (it only rises) and "
                f"{highest} (the newest key version)")
        with self._create_lock:
            updated = self.sign(dataclasses.replace(self.store.collection(collection_id),
                                                    min_key_version=min_key_version, mac=b""))
            self.store.update_collection(updated)
        log.info("minimum key version set", collection_id=collection_id, version=min_key_version)
        return updated

    def update_collection(self, collection_id: str, threshold: float | None = None,
                          require_purpose: bool | None = None) -> CollectionInfo:
        """Change a collection's threshold or purpose requirement (the admin's call; the
        API audits it with the new values). Matches in flight finish under the old row."""
        if threshold is None and require_purpose is None:
            raise InvalidArgument("nothing to update: set threshold or require_purpose")
        threshold = None if threshold is None else check_threshold(threshold)
        _, gallery = self._collection(collection_id)
        # The gallery's write lock: a key rotation's switch signs the row it read under it.
        with self._create_lock, gallery.write_lock:
            row, _ = self._collection(collection_id)
            policy = CollectionPolicy.from_json(row.policy)
            if require_purpose is not None:
                policy = dataclasses.replace(policy, require_purpose=bool(require_purpose))
            updated = self.sign(dataclasses.replace(
                row, threshold=row.threshold if threshold is None else threshold,
                policy=policy.to_json(), mac=b""))
            self.store.update_collection(updated)
        log.info("collection updated", collection_id=collection_id)
        return self.get_collection(collection_id)

    def start_import(self, collection_id: str):  # type: ignore[no-untyped-def]
        """A bulk import session (:mod:`vault.imports`)."""
        from vault.imports import ImportSession
        return ImportSession(self, collection_id)

    def block_row(self, gallery: CollectionGallery, block: Block, digest: bytes,
                  sketch: bytes | None) -> BlockRow:
        return self.sign(BlockRow(gallery.collection_id, gallery.key_version, block.block_no,
                                  block.kind, block.generation, block.levels, block.fill, digest,
                                  sketch, b""))
