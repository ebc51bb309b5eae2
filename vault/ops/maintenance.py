"""Background maintenance: journal checkpoints, erasure of deleted templates, old files.

- **Checkpoint**: the live templates of every journal page move into mixed blocks by
  blind re-encryption (:meth:`vault.decider.Decider.reencrypt`): the matcher masks each
  page with values uniform mod q, the decider decrypts the masked page, moves each
  template's D coefficients into coefficient ``slot`` of the block's D plaintexts and
  encrypts them afresh; the matcher subtracts the moved mask and adds the result to the
  block. No template is decrypted; the pages (and with them the values of templates
  deleted while in the journal) leave the database.
- **Compaction**: a block holding deleted templates' values is re-encrypted the same way
  with those coefficients left out: after it, decrypting the block shows zeros there. The
  replaced block file is zero-filled before it is removed; the erased templates'
  tombstones are deleted.
- **Reaching the disk**: a pass that rewrote anything ends by truncating the WAL, so that
  no older page image of an erased row or ciphertext stays in it, and the zeroed pages
  (``secure_delete``) are copied over the main file. :func:`schedule` starts erasure early
  enough that the replaced files are gone too within ``erase_after``.

Both run with the gallery's block lock (one block job at a time) and commit under its
write lock, re-reading template rows there, so a deletion made meanwhile is kept: the
template stays deleted, and if its values were just copied, the next pass erases them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np

from vault import logs
from vault.core import Core, Tuning
from vault.crypto.reencrypt import blind_reencrypt
from vault.decider import Moves
from vault.domain.errors import DataLoss, VaultError
from vault.domain.records import BLOCK, DELETED, LIVE, MIXED, PAGE, TemplateRow
from vault.gallery import CollectionGallery
from vault.gallery import pages as page_ops
from vault.he import poly
from vault.ops.commit import BlockCommit, check_stored

log = logs.get("vault.maintenance")

# Seconds a replaced block file (at most; see schedule) and a replaced key version are kept
# for matches that may still use them.
RETIRE_GRACE = 30.0


def checkpoint(core: Core, gallery: CollectionGallery) -> int:
    """Move every journal page's templates into mixed blocks; returns how many moved."""
    cid, version = gallery.collection_id, gallery.key_version
    store, n, dim = core.store, gallery.params.slots, gallery.dimension
    with gallery.block_lock:
        with gallery.write_lock:
            if gallery.retired:
                return 0
            pages = sorted(gallery.pages.values(), key=lambda p: p.page_no)
            gallery.seal_pages(p.page_no for p in pages)
        if not pages:
            return 0
        rows = {p.page_no: store.templates_in(cid, version, PAGE, p.page_no) for p in pages}
        # Everything live now moves; a deletion after this point leaves a tombstone.
        moving = [(i, t) for i, p in enumerate(pages) for t in rows[p.page_no]
                  if t.state == LIVE and t.slot < p.fill]
        held = [p.scored if p.scored is not None else page_ops.scored(gallery.ctx, p.ct)
                for p in pages]  # at the score prime, templates at the template scale
        levels = min(h.shape[1] for h in held)
        moduli = gallery.ctx.level_moduli(levels)
        tail = gallery.mixed_tail()
        if tail is not None and tail.levels != levels:
            tail = None
        # Target places: the mixed tail's free slots first, then new mixed blocks.
        places: list[tuple[int, int]] = []  # (target block index, slot) per moving template
        index, slot = 0, tail.fill if tail is not None else 0
        for _ in moving:
            if slot >= n:
                index, slot = index + 1, 0
            places.append((index, slot))
            slot += 1
        block_count = index + 1 if moving else 0
        reuse_tail = tail is not None and block_count > 0
        block_nos = ([tail.block_no] if tail is not None and reuse_tail else []) + \
            gallery.new_block_numbers(block_count - int(reuse_tail))

        count = len(moving)
        src_ct = np.repeat([i for i, _ in moving], dim)
        src_pos = (np.array([t.slot for _, t in moving], np.int64)[:, None] * dim
                   + np.arange(dim)[None, :]).reshape(-1)
        dst_ct = (np.array([b for b, _ in places], np.int64)[:, None] * dim
                  + np.arange(dim)[None, :]).reshape(-1)
        dst_pos = np.repeat([s for _, s in places], dim)
        moves = Moves(block_count * dim, src_ct, src_pos, dst_ct, dst_pos)
        fresh = None
        if count:
            fresh = blind_reencrypt(core.decider, gallery.ctx, cid, version,
                                    np.stack([h[:, :levels] for h in held]), True, moves,
                                    version)

        with BlockCommit(core, gallery) as unit:  # files, transaction, install, retire
            new_blocks = []
            for b, block_no in enumerate(block_nos):
                assert fresh is not None  # blocks are written only when templates move
                cts = fresh[b * dim:(b + 1) * dim]
                fill = 1 + max((s for bb, s in places if bb == b), default=-1)
                if b == 0 and reuse_tail and tail is not None:
                    cts = poly.add(core.read_block(gallery, tail), cts, moduli)
                    generation, fill = tail.generation + 1, max(fill, tail.fill)
                    unit.replaces(block_no, tail.generation)
                else:
                    generation = 1
                block = unit.write(block_no, MIXED, generation, fill, cts, moduli)
                new_blocks.append((block, core.block_row(gallery, block, block.digest, None)))
            del fresh

            with gallery.write_lock:
                changed: list[TemplateRow] = []
                erased: list[tuple[str, int]] = []
                moved_ids = {t.template_id: places[k] for k, (_, t) in enumerate(moving)}
                stored = {p.page_no: store.templates_in(cid, version, PAGE, p.page_no)
                          for p in pages}
                check_stored(core, cid, [t for rows in stored.values() for t in rows])
                for p in pages:
                    for t in stored[p.page_no]:
                        if t.template_id in moved_ids:
                            b, slot = moved_ids[t.template_id]
                            changed.append(core.sign(replace(t, tier=BLOCK, loc=block_nos[b],
                                                              slot=slot, erased=0, mac=b"")))
                        elif t.state == DELETED:
                            # Deleted before the checkpoint: its page, values and all, is dropped,
                            # and its tombstone with it.
                            erased.append((t.template_id, version))
                dropped = [(cid, version, p.page_no) for p in pages]
                unit.commit(lambda: store.write_relocation([row for _, row in new_blocks], changed,
                                                           dropped, erased))
                for b, (block, _row) in enumerate(new_blocks):
                    moved = [(pages[i].page_no, t.slot, places[k][1])
                             for k, (i, t) in enumerate(moving) if places[k][0] == b]
                    gallery.install_block(block, moved)
                gallery.drop_pages(p.page_no for p in pages)
    log.info("journal checkpoint", collection_id=cid, count=count, blocks=len(new_blocks))
    return count


def compact(core: Core, gallery: CollectionGallery, block_no: int) -> int:
    """Erase the values of a block's deleted templates; returns how many were erased."""
    cid, version = gallery.collection_id, gallery.key_version
    store, n, dim = core.store, gallery.params.slots, gallery.dimension
    with gallery.block_lock:
        block = gallery.blocks.get(block_no)
        if block is None or gallery.retired:
            return 0
        erase = [t for t in store.templates_in(cid, version, BLOCK, block_no)
                 if t.state == DELETED and not t.erased]
        if not erase:
            return 0
        slots = np.array(sorted({t.slot for t in erase}), np.int64)
        moduli = gallery.ctx.level_moduli(block.levels)
        row = store.block(cid, version, block_no)
        if row is None:
            raise DataLoss("a block's record is missing")
        keep = np.setdiff1d(np.arange(n), slots)
        moves = Moves(dim, np.repeat(np.arange(dim), keep.size), np.tile(keep, dim),
                      np.repeat(np.arange(dim), keep.size), np.tile(keep, dim))
        fresh = blind_reencrypt(core.decider, gallery.ctx, cid, version,
                                core.read_block(gallery, block), False, moves,
                                version)
        generation = block.generation + 1
        with BlockCommit(core, gallery) as unit:
            new = unit.write(block_no, block.kind, generation, block.fill, fresh, moduli,
                             block.groups, block.centroid)
            unit.replaces(block_no, block.generation)
            with gallery.write_lock:
                # The tombstones of the values left out go (a row deleted meanwhile is still
                # live in the rows erased here: it is erased by the next pass).
                unit.commit(lambda: store.write_relocation(
                    [core.block_row(gallery, new, new.digest, row.sketch)], [], [],
                    [(t.template_id, version) for t in erase]))
                gallery.install_block(new)
    log.info("erased deleted templates", collection_id=cid, count=len(erase), blocks=1)
    return len(erase)


# Change-feed rows kept for standby replicas (vault.ops.follow); one further behind reloads.
FEED_RETENTION_SECONDS = 3600.0


def schedule(tuning: Tuning) -> tuple[float, float]:
    """(seconds after a deletion at which its erasure starts, grace before a replaced block
    file is zero-filled and removed), so that a deletion's last byte leaves the data
    directory within ``erase_after``: erasure, then the WAL truncation in the same pass,
    then the file after its grace, each up to one maintenance interval late (an
    ``erase_after`` shorter than that: as soon as possible)."""
    grace = min(RETIRE_GRACE, tuning.erase_after / 4)
    return max(0.0, tuning.erase_after - grace - 2 * tuning.maintenance_interval), grace


# A journal as first seen in its current state: each page's (number, fill), and when.
Journal = tuple[tuple[tuple[int, int], ...], float]


def _journal(gallery: CollectionGallery) -> tuple[tuple[int, int], ...]:
    """What changes when a journal is written: each page's number and fill."""
    return tuple(sorted((p.page_no, p.fill) for p in list(gallery.pages.values())))


def run_once(core: Core, force: bool = False,
             journals: dict[tuple[str, int], Journal] | None = None) -> None:
    """Checkpoint full journals, erase deletions that are due, remove retired files.

    ``journals``: each journal as a pass first saw it as it is now, and when (kept by
    :func:`run_forever`); one unchanged for ``journal_quiet`` seconds is checkpointed
    however few pages it holds. Every 1:N scores each page apart (a page of N // D
    templates costs about what a block of N does), so pages left below ``journal_pages``
    once enrollments stop would slow every match until the next burst (the match_latency
    bench measured 3.3 or 6.6 ms at random, by where the last pass fell)."""
    now = time.monotonic()
    tuning = core.tuning
    start, grace = schedule(tuning)
    rewrote = False
    # A standby replica rewrites nothing: the primary checkpoints and erases for both.
    galleries = core.galleries() if core.may_write() else []
    if core.replica is not None and core.replica.primary:
        try:
            core.store.prune_changes(FEED_RETENTION_SECONDS)
        except VaultError as exc:
            log.warning("maintenance deferred", error_type=type(exc).__name__)
    if journals is not None:  # forget replaced key versions and deleted collections
        for gone in set(journals) - {(g.collection_id, g.key_version) for g in galleries}:
            del journals[gone]
    for gallery in galleries:
        cid, version = gallery.collection_id, gallery.key_version
        try:
            pending = core.store.unerased(cid, version)
            # Holders not in deleted_since hold deletions from before this process: due.
            due = [(tier, loc) for tier, loc in pending
                   if force or now - core.deleted_since.get((cid, version, tier, loc), -1e18) >= start]
            journal = _journal(gallery)
            seen = journals.get((cid, version)) if journals is not None else None
            quiet = (bool(journal) and tuning.journal_quiet > 0 and seen is not None
                     and seen[0] == journal and now - seen[1] >= tuning.journal_quiet)
            if (len(gallery.pages) >= tuning.journal_pages or quiet
                    or any(tier == PAGE for tier, _ in due) or (force and gallery.pages)):
                checkpoint(core, gallery)
                rewrote = True
            if journals is not None:
                after = _journal(gallery)
                if seen is None or seen[0] != after:
                    journals[(cid, version)] = (after, now)
            for tier, loc in due:
                if tier == BLOCK:
                    rewrote = compact(core, gallery, loc) > 0 or rewrote
            left = set(core.store.unerased(cid, version))
            for key in [k for k in list(core.deleted_since) if k[:2] == (cid, version)]:
                if key[2:] not in left:
                    del core.deleted_since[key]
        except VaultError as exc:
            log.warning("maintenance deferred", collection_id=cid, error_type=type(exc).__name__)
    # Dropped pages, erased rows and older page images of what they held are still in the
    # WAL (and the main file) until a checkpoint copies the zeroed pages over them; a busy
    # database (a reader) is tried again on the next pass.
    core.wal_dirty = core.wal_dirty or rewrote
    if core.wal_dirty:
        try:
            core.store.checkpoint_wal()
            core.wal_dirty = False
        except VaultError as exc:
            log.warning("WAL truncation deferred", error_type=type(exc).__name__)
    # Keys of a replaced version hold no deleted values: matches in flight keep them longer.
    core.sweep_retired(grace, everything=force, key_grace=RETIRE_GRACE)
    try:
        core.attempts.prune()
    except VaultError as exc:
        log.warning("maintenance deferred", error_type=type(exc).__name__)


def run_forever(core: Core, stop: threading.Event) -> None:
    """The maintenance thread: a pass every ``maintenance_interval`` until ``stop``."""
    journals: dict[tuple[str, int], Journal] = {}
    while not stop.wait(core.tuning.maintenance_interval):
        try:
            run_once(core, journals=journals)
        except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
            log.error("maintenance error", error_type=type(exc).__name__)
