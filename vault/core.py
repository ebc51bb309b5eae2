"""The roles of one vault wired together, and what every operation needs of them.

:class:`Core` holds the store, the HSM client, the protector, the decider, the galleries and
their locks; it seals and MACs records and resolves a collection to its row and gallery.
It performs no operation itself: each is a module of :mod:`vault.ops` taking a Core, and
:class:`vault.service.Vault` puts them together as the one object the API calls.

Order inside every state-changing operation: validate, then compute everything that needs
the HSM (indexes, MACs, wrapping) and every ciphertext, then write in one transaction
(block files first, fsynced, named by the rows), then make the change visible in memory.
A failure before the transaction writes nothing; the transaction is atomic; so no request
leaves a partial write behind.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from vault import custody, he, logs
from vault.attempts import AttemptLimits, Attempts
from vault.audit import AuditLog
from vault.block_files import BlockStore
from vault.crypto import aad
from vault.decider import Decider
from vault.decider.keeper import PII_KEY, Keeper
from vault.domain.errors import (
    DataLoss,
    FailedPrecondition,
    NotFound,
)
from vault.domain.model import CollectionPolicy
from vault.domain.records import (
    BlockRow,
    CollectionRow,
    PageRow,
    TemplateRow,
)
from vault.gallery import CollectionGallery, Routing
from vault.gallery import blocks as block_ops
from vault.gallery.blocks import Block
from vault.gallery.shards import RaySettings, ShardPool
from vault.gallery.workers import EncryptionPool
from vault.keys import envelope
from vault.keys.integrity import Integrity, LiveSet
from vault.keys.roles import HsmRoles
from vault.memory import MemoryGuard
from vault.protector import prepare
from vault.store import Store
from vault.validation import (
    check_collection_id,
)

_SKETCH_KEY = "sketch"
_AUDIT_REF_KEY = "audit-ref"
_LIVE_SET_KEY = "live-set"

Signed = TypeVar("Signed", CollectionRow, BlockRow, PageRow, TemplateRow)


@dataclass(frozen=True)
class Tuning:
    """Knobs of the encrypted gallery (defaults suit the embedded server).

    ``journal_pages``: journal pages that trigger a checkpoint into blocks (bounds the
    pages every 1:N match scores: about 0.5 ms each). ``erase_after``: seconds after a deletion by which
    its values are removed from the ciphertexts (plus one maintenance pass).
    ``maintenance_interval``: seconds between maintenance passes (0: none; tests call
    :meth:`Vault.maintain`). ``workers``: encryption processes (0 or 1: in process).
    ``journal_quiet``: seconds a journal below ``journal_pages`` may sit unchanged (no
    enrollment) before a pass checkpoints it anyway (0: never). ``memory_reserve``: bytes
    of the machine's memory imports, enrollments and key rotations must leave available
    (vault.memory; 0: no check; not applied at all when Ray shards hold the blocks).
    """

    routing: Routing = field(default_factory=Routing)
    journal_pages: int = 16
    erase_after: float = 60.0
    maintenance_interval: float = 5.0
    journal_quiet: float = 60.0
    workers: int | None = None
    import_chunk_bytes: int = 1 << 29
    ray: RaySettings | None = None  # blocks scored in Ray shards (vault.gallery.shards)
    # Replicas on one PostgreSQL store (vault.ops.follow): the write lease's time to live,
    # and seconds between a standby's reads of the change feed.
    lease_ttl: float = 10.0
    refresh_interval: float = 0.5
    memory_reserve: int = 0

log = logs.get("vault.service")


class Follower(Protocol):
    """A replica's part (vault.ops.follow.Replica), as the operations see it."""

    @property
    def primary(self) -> bool: ...

    def require_primary(self) -> None: ...

    def catch_up(self, force: bool = False) -> int: ...

    def close(self) -> None: ...


class Core:
    """The wired roles of one vault (see the module docstring)."""

    def __init__(self, store: Store, hsm: HsmRoles, data_dir: Path,
                 params: he.HeParams = he.DEFAULT_PARAMS, limits: AttemptLimits | None = None,
                 tuning: Tuning | None = None, clock: Callable[[], float] = time.time,
                 decider: Decider | None = None) -> None:
        self.store = store
        self.audit: AuditLog | None = None  # set by open(); see vault.audit
        self.limits = limits or AttemptLimits()
        self.tuning = tuning or Tuning()
        self.hsm = hsm
        self.params = params
        self.integrity = Integrity(hsm)
        self.attempts = Attempts(store, self.integrity, hsm, self.limits, clock, self.event)
        self.files: BlockStore = store.block_store(data_dir / "blocks")
        self.encryption = EncryptionPool(self.tuning.workers)
        self.memory = MemoryGuard(0 if self.tuning.ray is not None else self.tuning.memory_reserve)
        # The key holder: a child process under `vault serve`, else in this process.
        self.decider: Decider = decider or Keeper(hsm, encrypt=self.encryption.encrypt)
        self.current_galleries: dict[str, CollectionGallery] = {}  # the current key version's
        # Key rotations: the target version's gallery, filled block by block while the
        # current one serves (vault.ops.rotation).
        self.next_galleries: dict[str, CollectionGallery] = {}
        self.jobs_lock = threading.Lock()
        self.keys_lock = threading.Lock()
        self.switch_lock = threading.Lock()
        self.job_threads: dict[str, threading.Thread] = {}
        self.stopping = threading.Event()
        # Collections found damaged at load, with what their RPCs answer (DATA_LOSS).
        self.damage_reasons: dict[str, str] = {}
        self._checked_rows: set[CollectionRow] = set()  # collection rows whose MAC held
        self.integrity_events: list[tuple[str, str, int]] = []
        # (collection, key version, tier, loc) -> monotonic time of its first deletion not
        # yet erased; holders not in it (found at start) are due at once.
        self.deleted_since: dict[tuple[str, int, int, int], float] = {}
        self.wal_dirty = False  # erased bytes may linger in the WAL (vault.ops.maintenance)
        self.create_lock = threading.Lock()
        self._retired: list[tuple[float, Path, bool]] = []
        self._retired_keys: list[tuple[float, str, int]] = []
        self._retired_lock = threading.Lock()
        with store.exclusive_start():  # replicas started together: one ceremony, not two
            new = not store.has_wrapped_keys()
            created = hsm.ensure_keys(create=new)
            custody.bind_token(store, hsm, new)  # a different token is refused, not half-used
            if created:
                log.info("key ceremony: created keys in the HSM", count=len(created))
            self.decider.bind(lambda: store.wrapped_key(PII_KEY, 1), store.collection_key)
            made = self.decider.init_pii(store.wrapped_key(PII_KEY, 1))
            if made is not None:  # created and wrapped by the decider: only the blob is here
                store.put_wrapped_key(PII_KEY, 1, made)
            self.sketch_key = envelope.DataKey(self.data_key(_SKETCH_KEY))
            self.audit_ref_key = self.data_key(_AUDIT_REF_KEY)
            store.live_set = LiveSet(self.data_key(_LIVE_SET_KEY), self.integrity)
        self.maintenance: threading.Thread | None = None  # vault.service starts it
        # Set on a PostgreSQL store (vault.ops.follow): the write lease and the change feed.
        self.replica: Follower | None = None
        self.feed_start = store.last_change()  # before loading: what loading may miss follows
        self.shards: ShardPool | None = None
        if self.tuning.ray is not None:  # shards read block files, or are sent blocks from rows
            self.shards = ShardPool.of(self.files, self.tuning.ray).start()

    def close(self) -> None:
        """Stop the background threads, wait for them, then release workers, files, token."""
        self.stopping.set()
        if self.maintenance is not None:
            self.maintenance.join(timeout=60)
        for thread in list(self.job_threads.values()):
            thread.join(timeout=120)
        if self.replica is not None:
            self.replica.close()
        self.encryption.close()
        self.decider.close()
        if self.shards is not None:
            self.shards.close()
        if self.audit is not None:
            self.audit.close()
        self.store.close()
        self.hsm.close()

    def data_key(self, name: str, version: int = 1) -> bytes:
        """A data key held wrapped in the store, created on first use."""
        bound = aad.data_key(name, version)
        blob = self.store.wrapped_key(name, version)
        if blob is None:
            key = self.hsm.random(32)
            self.store.put_wrapped_key(name, version, self.hsm.wrap(key, bound))
            return key
        return self.hsm.unwrap(blob, bound)

    def sign(self, row: Signed) -> Signed:
        """The row with its MAC (computed in the HSM) filled in."""
        return dataclasses.replace(row, mac=self.integrity.mac(*row.mac_fields()))

    def verified(self, row: Signed) -> bool:
        """Whether the row's MAC covers its fields (checked in the HSM)."""
        return self.integrity.check(row.mac, *row.mac_fields())

    def verified_all(self, rows: Sequence[Signed]) -> bool:
        """Whether every row's MAC holds, checked in one token call."""
        return self.integrity.check_all([(row.mac, row.mac_fields()) for row in rows])

    def seal_sketch(self, collection_id: str, key_version: int, block_no: int,
                    centroid: np.ndarray) -> bytes:
        """A block's pre-filter centroid, sealed under the sketch data key."""
        return self.sketch_key.encrypt(np.asarray(centroid, np.float32).tobytes(),
                                        aad.sketch(collection_id, key_version, block_no))

    def seal_subjects(self, collection_id: str, items: Sequence[tuple[bytes, str]]) -> list[bytes]:
        """(blind index, subject id) pairs sealed by the decider under the PII data key,
        each bound to its blind index."""
        return self.decider.seal_subjects(collection_id, items) if items else []

    def protect(self, collection_id: str, key_version: int, dimension: int,
                values: Sequence[float], field: str = "embedding",
                reference_mean: np.ndarray | None = None) -> np.ndarray:
        """Validate, normalise and centre an embedding here, then have the decider apply
        the key version's transform (which only it holds); a unit vector (D,)."""
        x = prepare(values, dimension, field, reference_mean)
        return self.decider.transform(collection_id, key_version, dimension, x)

    def event(self, kind: str, collection_id: str, subject_hmac: bytes, outcome: str,
               method: str = "Match", actor: str = "vault") -> None:
        """An audit entry the vault writes on its own (alerts, integrity, admin overrides)."""
        if self.audit is not None:
            self.audit.append(kind, uuid.uuid4().hex[:16], actor, method, collection_id,
                              [subject_hmac], outcome)

    def integrity_failure(self, kind: str, collection_id: str, count: int = 1) -> None:
        """Log a damaged record found at load; it is audited once the audit log is open."""
        log.error("integrity failure", kind=kind, collection_id=collection_id, count=count)
        self.integrity_events.append((kind, collection_id, count))

    def damage(self, collection_id: str, kind: str, message: str, count: int = 1) -> None:
        """Stop serving a collection (DATA_LOSS with ``message``) and record why."""
        self.damage_reasons.setdefault(collection_id, message)
        self.integrity_failure(kind, collection_id, count)

    def damaged(self) -> dict[str, str]:
        """Collections that answer DATA_LOSS, with the reason (for health and operators)."""
        return dict(self.damage_reasons)

    def gallery(self, collection_id: str, key_version: int) -> CollectionGallery | None:
        """The gallery of a key version: the current one or a rotation's target."""
        for found in (self.current_galleries.get(collection_id), self.next_galleries.get(collection_id)):
            if found is not None and found.key_version == key_version:
                return found
        return None

    def galleries(self) -> list[CollectionGallery]:
        """The current key version's gallery of every loaded collection."""
        return list(self.current_galleries.values())

    def install_current(self, collection_id: str, gallery: CollectionGallery) -> None:
        """A key rotation's switch: its target version serves from now on."""
        self.current_galleries[collection_id] = gallery
        self.next_galleries.pop(collection_id, None)

    def retire_key_version(self, collection_id: str, key_version: int) -> None:
        """Forget a replaced version's keys once matches in flight are done with them."""
        with self._retired_lock:
            self._retired_keys.append((time.monotonic(), collection_id, key_version))

    def read_block(self, gallery: CollectionGallery, block: Block) -> np.ndarray:
        """Every prime of a block, (D, 2, levels, N), read from its file and checked."""
        path = self.files.path(gallery.collection_id, gallery.key_version, block.block_no,
                               block.generation)
        try:
            residues, digest = self.files.read(path)
        except (OSError, ValueError) as exc:
            raise DataLoss("a block file is missing or unreadable") from exc
        if digest != block.digest:
            log.error("integrity failure", kind="block_file", collection_id=gallery.collection_id)
            raise DataLoss("a block file changed on disk")
        return np.stack(residues, axis=2)

    def may_write(self) -> bool:
        """False on a standby replica (vault.ops.follow): it changes no gallery state."""
        return self.replica is None or self.replica.primary

    def require_primary(self) -> None:
        """UNAVAILABLE on a standby replica: enrollments, imports, deletions, key and
        collection administration go to the primary."""
        if self.replica is not None:
            self.replica.require_primary()

    def catch_up(self) -> bool:
        """A standby reads the primary's newest changes now (a request found rows its
        memory does not have yet); True on a standby, once it is current: the changes may
        have been applied by its refresh thread while this call waited for it, so the
        caller looks again either way."""
        if self.replica is None or self.replica.primary:
            return False
        self.replica.catch_up()
        return True

    def current(self, collection_id: str,
                    damaged_ok: bool = False) -> tuple[CollectionRow, CollectionGallery]:
        """The collection's row and current gallery; ``damaged_ok``: also when its stored
        rows failed their live-set check (a deletion must still be possible)."""
        check_collection_id(collection_id)
        row, gallery = self._row_and_gallery(collection_id)
        if (row is not None and (gallery is None or gallery.key_version != row.key_version)
                and self.catch_up()):  # a standby behind the primary's switch or creation
            row, gallery = self._row_and_gallery(collection_id)
        if row is None:
            raise NotFound("collection not found")
        if collection_id in self.damage_reasons and not (damaged_ok and gallery is not None):
            raise DataLoss(self.damage_reasons[collection_id])
        if gallery is None or gallery.key_version != row.key_version:
            raise DataLoss("collection record does not match the loaded key version")
        if row.key_version < row.min_key_version:
            raise FailedPrecondition("collection key version is below its minimum")
        if not damaged_ok:  # threshold, policy, reference mean: as signed, on every path
            self.release_settings(row)
            check_revision(self, row, gallery)
        return row, gallery

    def _row_and_gallery(self, collection_id: str) -> tuple[CollectionRow | None,
                                                              CollectionGallery | None]:
        with self.switch_lock:  # the row and the gallery, both before or both after a switch
            return self.store.collection(collection_id), self.current_galleries.get(collection_id)

    def has_collection(self, collection_id: str) -> bool:
        """True when the collection is loaded (no store read)."""
        return collection_id in self.current_galleries

    def release_settings(self, row: CollectionRow) -> CollectionPolicy:
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

    @staticmethod
    def reference_mean(row: CollectionRow) -> np.ndarray | None:
        """A collection's reference mean (vault.protector), or None."""
        if row.reference_mean is None:
            return None
        return np.frombuffer(row.reference_mean, "<f8")

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
            self.files.remove(path, erase=erase)
        with self._retired_lock:
            keys = [r for r in self._retired_keys if everything or now - r[0] >= key_grace]
            self._retired_keys = [r for r in self._retired_keys if r not in keys]
        for _, cid, version in keys:
            self.decider.forget(cid, version)
            if self.shards is not None:
                self.shards.forget(cid, version)

    def write_block(self, gallery: CollectionGallery, block_no: int, kind: int, generation: int,
                    fill: int, cts: np.ndarray, moduli: Sequence[int],
                    groups: np.ndarray | None = None,
                    centroid: np.ndarray | None = None) -> Block:
        """Write one block generation's file (every prime of ``cts``, (D, 2, levels, N),
        fsynced) and return the block it holds, not yet installed nor committed: the
        caller's transaction names it, then installs it (import, checkpoint, compaction,
        rotation all go through here)."""
        path = self.files.path(gallery.collection_id, gallery.key_version, block_no, generation)
        digest = self.files.write(path, block_ops.split_levels(cts), moduli)
        owners = np.full(gallery.params.slots, -1, np.int32) if groups is None else groups
        return Block(block_no, kind, generation, fill, len(moduli),
                     block_ops.held(cts[:, :, 0, :], moduli[0]), digest, owners, centroid)

    def block_row(self, gallery: CollectionGallery, block: Block, digest: bytes,
                  sketch: bytes | None) -> BlockRow:
        """The block's row, MACed, as the caller's transaction writes it."""
        return self.sign(BlockRow(gallery.collection_id, gallery.key_version, block.block_no,
                                  block.kind, block.generation, block.levels, block.fill, digest,
                                  sketch, b""))


def check_revision(core: Core, row: CollectionRow, gallery: CollectionGallery | None) -> None:
    """DATA_LOSS when a collection row older than one this gallery has served is what
    the store holds: a valid copy of the row put back (a lowered threshold, a purpose
    requirement dropped, an older minimum key version). A row read just before an
    update committed is older too, but the store then holds the newer one."""
    if gallery is None:
        return
    if row.revision >= gallery.row_revision:
        gallery.row_revision = row.revision
        return
    stored = core.store.collection(row.collection_id)
    if stored is None or stored.revision < gallery.row_revision:
        message = ("collection record failed its integrity check: an older copy of it "
                   "was put back")
        core.damage(row.collection_id, "collection_replayed", message)
        raise DataLoss(message)
