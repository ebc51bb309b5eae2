"""Bulk import: many templates in one stream, encrypted straight into blocks.

Items arrive in batches. Each is validated and protected at once (errors are answered
at once, per item); valid items wait in a chunk buffer. A full chunk (up to 64 blocks of
4,096 templates, within a memory budget) is grouped by balanced clustering into blocks of
templates near each other (:mod:`vault.gallery.prefilter`), each block's D plaintexts are
encrypted in worker processes and written as one file, what does not fill a block goes to
the mixed tail block (then new mixed blocks), and everything commits in one transaction.
Then the chunk's results go out. An item's ``request_id`` makes it idempotent, as for Enroll:
a retried stream gets the first answers and stores nothing twice.

Imports are first enrollments: an item for a subject that already had templates before
this stream is refused (PERMISSION_DENIED, per item), since nothing checks its face 1:1
against them; further faces of an enrolled subject go through Enroll, which does.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vault import logs
from vault.core import Core
from vault.domain.errors import AlreadyExists, PermissionDenied, Unavailable, VaultError
from vault.domain.records import BLOCK, CLUSTERED, DELETED, LIVE, MIXED, BlockRow, TemplateRow
from vault.gallery import CollectionGallery
from vault.gallery import blocks as block_ops
from vault.gallery.blocks import Block
from vault.gallery.prefilter import balanced_clusters, sketch
from vault.he import poly
from vault.ops import enroll
from vault.ops.commit import BlockCommit
from vault.protector import centre, validate_embedding
from vault.validation import check_request_id, check_subject_id

log = logs.get("vault.imports")

MAX_CHUNK_BLOCKS = 64


@dataclass(frozen=True)
class ImportItem:
    """One template to import (nothing of it in its repr)."""

    subject_id: str = field(repr=False)
    embedding: Sequence[float] = field(repr=False)
    request_id: str = field(default="", repr=False)


@dataclass(frozen=True)
class ImportResult:
    """The outcome of one item, by its position in the stream."""

    index: int
    template_id: str = ""
    key_version: int = 0
    error: VaultError | None = None
    replayed: bool = False  # an earlier item or call with its request_id stored it


@dataclass
class _Pending:
    index: int
    template: np.ndarray = field(repr=False)
    subject_id: str = field(repr=False)
    subject_hmac: bytes = field(repr=False)
    request_hmac: bytes | None = field(repr=False)


class ImportSession:
    """One import stream into one collection."""

    def __init__(self, core: Core, collection_id: str) -> None:
        core.require_primary()  # a standby replica changes no gallery state
        self.core = core
        self.row, self.gallery = core.current(collection_id)
        self.collection_id = collection_id
        slots, dim = self.gallery.params.slots, self.row.dimension
        budget = max(1, core.tuning.import_chunk_bytes // (8 * dim * slots))
        self.chunk = slots * min(MAX_CHUNK_BLOCKS, budget)
        self._buffer: list[_Pending] = []
        self._pending_requests: dict[bytes, _Pending] = {}
        self._followers: list[tuple[int, _Pending]] = []  # repeats of a pending request id
        self._next_index = 0
        self._mean = core.reference_mean(self.row)
        self._new_subjects: set[bytes] = set()  # first enrolled by this stream
        self._stored_subjects: set[bytes] = set()  # of those, the ones a chunk stored
        self.stored = 0
        self.failed = 0

    def add(self, items: Sequence[ImportItem]) -> list[ImportResult]:
        """Take a batch; returns the results known now (errors, retries, full chunks)."""
        results: list[ImportResult] = []
        valid: list[tuple[int, ImportItem, np.ndarray]] = []
        for item in items:
            index = self._next_index
            self._next_index += 1
            try:
                item = dataclasses.replace(item, subject_id=check_subject_id(item.subject_id))
                check_request_id(item.request_id)
                x = validate_embedding(item.embedding, self.row.dimension)
                valid.append((index, item, x if self._mean is None else centre(x, self._mean)))
            except VaultError as exc:
                results.append(self._failed(index, exc))
        if valid:
            # Held until their chunk is stored: a stream buffers up to a chunk, and several
            # streams at once could take a full node past its reserve before any chunk.
            self.core.memory.require(len(valid) * self.row.dimension * 16,
                                     f"an import's next {len(valid)} items")
            protected = self.core.decider.transform(self.collection_id, self.row.key_version,
                                                    self.row.dimension,
                                                    np.stack([x for _, _, x in valid]))
            for (index, item, _), template in zip(valid, protected):
                result = self._accept(index, item, template)
                if result is not None:
                    results.append(result)
        while len(self._buffer) >= self.chunk:
            results += self._flush(self.chunk)
        return results

    def finish(self) -> list[ImportResult]:
        """Store what is buffered; the last results."""
        results = self._flush(len(self._buffer)) if self._buffer else []
        if self.stored:
            self._trim_log()
        log.info("import finished", collection_id=self.collection_id, count=self.stored,
                 status=f"failed={self.failed}")
        return results

    def _trim_log(self) -> None:
        """The chunks' transactions left the SQLite WAL at their high-water mark (343 MB
        at a million 512-d templates): give it back now. The import is done either way."""
        try:
            trimmed = self.core.store.trim_log()
        except VaultError as exc:
            trimmed = False
            log.warning("WAL truncation deferred", error_type=type(exc).__name__)
        if not trimmed:
            self.core.wal_dirty = True  # the maintenance pass tries again

    def _failed(self, index: int, exc: VaultError) -> ImportResult:
        self.failed += 1
        return ImportResult(index, error=exc)

    def _accept(self, index: int, item: ImportItem, template: np.ndarray) -> ImportResult | None:
        integrity = self.core.integrity
        subject_hmac = integrity.subject_index(self.collection_id, item.subject_id)
        request_hmac = (integrity.request_index(self.collection_id, item.request_id)
                        if item.request_id else None)
        try:
            previous = enroll.previous_answer(self.core, request_hmac, subject_hmac)
        except AlreadyExists as exc:
            return self._failed(index, exc)
        if previous is not None:
            return ImportResult(index, previous[0], previous[1], replayed=True)
        if subject_hmac not in self._new_subjects:
            if self.core.store.subject_templates(self.collection_id, subject_hmac):
                return self._failed(index, PermissionDenied(
                    "subject_id is already enrolled: add faces to it with Enroll, which "
                    "checks them against its templates"))
            self._new_subjects.add(subject_hmac)
        pending = _Pending(index, template, item.subject_id, subject_hmac, request_hmac)
        if request_hmac is not None:
            first = self._pending_requests.get(request_hmac)
            if first is not None:
                if first.subject_hmac != subject_hmac:
                    return self._failed(index, AlreadyExists(
                        "request_id was already used for another subject"))
                self._followers.append((index, first))
                return None
            self._pending_requests[request_hmac] = pending
        self._buffer.append(pending)
        return None

    def _flush(self, count: int) -> list[ImportResult]:
        chunk, self._buffer = self._buffer[:count], self._buffer[count:]
        ids, enrolled = store_chunk(self.core, self.gallery, chunk, self._stored_subjects)
        refused = {p.index for p in chunk if p.subject_hmac in enrolled}
        self._stored_subjects.update(p.subject_hmac for p in chunk if p.index not in refused)
        self.stored += len(chunk) - len(refused)
        done = {p.index: template_id for p, template_id in zip(chunk, ids)}
        version = self.gallery.key_version
        results = [self._failed(p.index, _enrolled_meanwhile()) if p.index in refused
                   else ImportResult(p.index, done[p.index], version) for p in chunk]
        waiting = []
        for index, first in self._followers:
            if first.index in refused:
                results.append(self._failed(index, _enrolled_meanwhile()))
            elif first.index in done:
                results.append(ImportResult(index, done[first.index], version, replayed=True))
            else:
                waiting.append((index, first))
        self._followers = waiting
        for p in chunk:
            if p.request_hmac is not None:
                self._pending_requests.pop(p.request_hmac, None)
        return results


def _enrolled_meanwhile() -> PermissionDenied:
    return PermissionDenied(
        "subject_id was enrolled by another call while this import was under way: add "
        "faces to it with Enroll, which checks them against its templates; nothing was "
        "stored for this item")


def store_chunk(core: Core, gallery: CollectionGallery, chunk: list[_Pending],
                stored_by_caller: set[bytes]) -> tuple[list[str], set[bytes]]:
    """Encrypt and store one chunk; returns the template ids, in chunk order, and the
    subjects refused because another call enrolled them after the caller checked
    (``stored_by_caller``: subjects the caller's own earlier chunks stored)."""
    cid, version = gallery.collection_id, gallery.key_version
    params, ctx = gallery.params, gallery.ctx
    n, moduli = params.slots, ctx.level_moduli(params.stored_levels)
    templates = np.stack([p.template for p in chunk])
    ids = [uuid.uuid4().hex for _ in chunk]
    with gallery.block_lock:
        clusters, leftover = balanced_clusters(templates, n)
        # Every block it writes is held in memory (at most one per cluster, the mixed tail
        # and new mixed blocks), and one more is built at a time: checked before numbering.
        most = len(clusters) + 1 + -(-len(leftover) // n) + 1
        core.memory.require(most * block_ops.held_bytes(templates.shape[1], params),
                            f"an import chunk of {len(chunk)} templates")
        # (block_no, kind, block it extends or None, members, first slot)
        targets: list[tuple[int, int, Block | None, np.ndarray, int]] = [(b, CLUSTERED, None, m, 0)
                   for b, m in zip(gallery.new_block_numbers(len(clusters)), clusters)]
        # What does not fill a block goes to the mixed tail, then to new mixed blocks:
        # the import has the plaintext, so this costs D encryptions per block touched.
        tail = gallery.mixed_tail()
        if tail is not None and len(leftover) and tail.levels == len(moduli):
            take = min(n - tail.fill, len(leftover))
            targets.append((tail.block_no, MIXED, tail, leftover[:take], tail.fill))
            leftover = leftover[take:]
        new_mixed = gallery.new_block_numbers(-(-len(leftover) // n))
        targets += [(b, MIXED, None, leftover[k * n:(k + 1) * n], 0) for k, b in enumerate(new_mixed)]

        with BlockCommit(core, gallery) as unit:  # files, transaction, install, retire
            blocks: list[Block] = []
            block_rows: list[BlockRow] = []
            places: dict[int, tuple[int, int]] = {}  # chunk index -> (block_no, slot)
            for block_no, kind, base, members, first in targets:
                plain = block_ops.dimension_major_plaintexts(templates[members], first, n,
                                                             params.template_scale, moduli)
                cts = core.encryption.encrypt(ctx, gallery.public_context, plain)
                del plain
                generation = 1
                if base is not None:
                    cts = poly.add(core.read_block(gallery, base), cts, moduli)
                    generation = base.generation + 1
                    unit.replaces(block_no, base.generation)
                centroid = sketch(templates[members]) if kind == CLUSTERED else None
                block = unit.write(block_no, kind, generation, first + len(members), cts, moduli,
                                   centroid=centroid)
                del cts
                blocks.append(block)
                sealed = (core.seal_sketch(cid, version, block_no, centroid)
                          if centroid is not None else None)
                block_rows.append(core.block_row(gallery, block, block.digest, sealed))
                for slot, i in enumerate(members.tolist(), first):
                    places[i] = (block_no, slot)

            def template_row(i: int, live: bool) -> TemplateRow:
                """Item ``i``'s template row, live or (a request answered meanwhile) a tombstone."""
                block_no, slot = places[i]
                p = chunk[i]  # a tombstone names no subject and no request
                return core.sign(TemplateRow(ids[i], cid, p.subject_hmac if live else b"", version,
                                              BLOCK, block_no, slot, p.request_hmac if live else None,
                                              LIVE if live else DELETED, 0, b""))

            rows = [template_row(i, True) for i in range(len(chunk))]
            with gallery.write_lock:
                if gallery.retired:  # a key rotation switched versions meanwhile
                    raise Unavailable("the collection's key version changed during the import; "
                                      "retry the stream (request ids make it safe)")
                # A request id committed meanwhile by another call: that call's answer stands;
                # the values encrypted here for it are stored as a deleted template, erased later.
                taken = core.store.existing_requests([p.request_hmac for p in chunk if p.request_hmac])
                # A subject enrolled by another call since this one checked (an Enroll, a
                # parallel import): a face added to it unchecked would pass as it. Stored
                # as a deleted template too, and refused.
                enrolled = core.store.enrolled_subjects(cid, sorted(
                    {p.subject_hmac for p in chunk} - stored_by_caller))
                for i, p in enumerate(chunk):
                    if p.request_hmac in taken:
                        rows[i] = template_row(i, False)
                        answered = core.store.template_by_request(p.request_hmac)
                        assert answered is not None  # it is in ``taken``
                        ids[i] = answered.template_id
                    elif p.subject_hmac in enrolled:
                        rows[i] = template_row(i, False)
                live = [p for p, row in zip(chunk, rows) if row.state == LIVE]
                sealed_ids = core.seal_subjects(cid, [(p.subject_hmac, p.subject_id) for p in live])
                subjects = [(cid, p.subject_hmac, s) for p, s in zip(live, sealed_ids, strict=True)]
                unit.commit(lambda: core.store.write_templates([], block_rows, rows, subjects))
                for block in blocks:
                    gallery.install_block(block)
                for row in rows:  # slots become live once their block is installed
                    if row.state == LIVE:
                        gallery.set_live(BLOCK, row.loc, row.slot, gallery.group(row.subject_hmac))
    log.info("import chunk stored", collection_id=cid, count=len(chunk), blocks=len(blocks))
    return ids, enrolled


__all__ = ["ImportItem", "ImportResult", "ImportSession"]
