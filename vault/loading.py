"""Loading a vault at start: every stored collection and key version checked and installed.

A record that fails its MAC, a block file whose digest differs, or a live set that is not
the committed one stops that collection (DATA_LOSS, logged and audited), never the vault."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vault import he, logs
from vault.core import Core
from vault.crypto import aad
from vault.domain.records import (
    BLOCK,
    DONE,
    PAGE,
    BlockRow,
    CollectionKeyRow,
    CollectionRow,
    PageRow,
)
from vault.gallery import CollectionGallery
from vault.gallery import pages as page_ops
from vault.gallery.blocks import Block
from vault.gallery.pages import Page
from vault.he.poly import residue_dtype

log = logs.get("vault.service")


def check_live_set(core: Core, cid: str, version: int) -> None:
    """The stored rows must be the set the collection committed to: a row deleted,
    restored from an older copy or replayed changes their digest."""
    state = core.store.live_set_state(cid, version)
    assert core.store.live_set is not None  # set by Core before loading
    if state is None or not core.store.live_set.check(state[2], cid, version, *state[:2]):
        core.damage(cid, "live_set_commitment", "collection record failed its integrity "
                     "check: its live-set commitment is missing or forged")
    elif core.store.live_set_digest(cid, version) != state[1]:
        core.damage(cid, "live_set", "collection record failed its integrity check: stored "
                     "templates, pages or blocks were deleted, restored or replayed")
    missing = core.store.subjects_missing(cid, version)
    if missing:
        core.damage(cid, "subject_missing", "collection record failed its integrity check: "
                     "subject records of live templates are missing", missing)


def load_collection(core: Core, row: CollectionRow) -> None:
    """Check a collection row and load its current key version (or record why not)."""
    cid = row.collection_id
    if not core.verified(row):
        core.damage(cid, "collection", "collection record failed its integrity check")
        return
    rotating = {j.to_version for j in core.store.key_jobs()
                if j.collection_id == cid and j.state != DONE}
    newest = core.store.newest_key_version(cid)
    if newest > row.key_version and newest not in rotating:
        # A valid but old collection row behind newer data: a replayed record (a
        # rollback to before a key rotation, say).
        core.damage(cid, "collection_replayed", "collection record failed its integrity "
                     "check: it is older than the data it names")
        return
    stale = core.store.count_below(cid, row.min_key_version)
    if stale:
        core.integrity_failure("below_min_key_version", cid, stale)
    key = core.store.collection_key(cid, row.key_version)
    if key is None:
        core.damage(cid, "collection_key_missing", "collection record failed its integrity "
                     "check: its key version is missing")
        return
    core.current_galleries[cid] = load_key_version(core, key, row.dimension)


def load_key_version(core: Core, key: CollectionKeyRow, dimension: int) -> CollectionGallery:
    """A stored key version: the decider unseals its secret key (this process never sees
    it), its gallery is loaded."""
    cid, version = key.collection_id, key.key_version
    params = he.HeParams.from_json(key.he_params)
    core.decider.load(key)
    gallery = CollectionGallery(cid, version, dimension, params, key.public_context,
                                core.tuning.routing, core.shards)
    bad = _load_blocks(core, gallery) + _load_pages(core, gallery)
    gallery.reserve_page_numbers(core.store.max_loc(cid, version, PAGE) + 1)
    gallery.reserve_block_numbers(core.store.max_loc(cid, version, BLOCK) + 1)
    bad_templates = _load_templates(core, gallery)
    if bad or bad_templates:
        # A 1:N over a missing holder would be a silent non-match: DATA_LOSS instead.
        gallery.damaged = True
        core.integrity_failure("records", cid, bad + bad_templates)
    check_live_set(core, cid, version)
    log.info("collection loaded", collection_id=cid, key_version=version,
             template_count=gallery.template_count(), blocks_total=len(gallery.blocks))
    return gallery


def load_rotations(core: Core) -> None:
    """The target versions of unfinished key rotations, as far as they got."""
    for job in core.store.key_jobs():
        current = core.current_galleries.get(job.collection_id)
        if job.state == DONE or current is None or current.key_version != job.from_version:
            continue
        key = core.store.collection_key(job.collection_id, job.to_version)
        if key is None:
            continue
        core.next_galleries[job.collection_id] = load_key_version(core, key, current.dimension)


def _read_block(core: Core, gallery: CollectionGallery,
                b: BlockRow) -> tuple[np.ndarray, bytes] | None:
    """A block generation's first prime and digest, None when it cannot be read."""
    try:  # hashing and file reads release the GIL: several at once
        residues, digest = core.files.read(
            core.files.path(gallery.collection_id, gallery.key_version, b.block_no, b.generation),
            levels=1, as_stored=True)
    except (OSError, ValueError):
        return None
    return residues[0], digest


def _checked_block(core: Core, gallery: CollectionGallery, b: BlockRow,
                   found: tuple[np.ndarray, bytes] | None) -> Block | None:
    """The block a row and its generation's bytes make, if the row MAC and the digest
    agree (no slot live yet); None otherwise."""
    if (found is None or found[1] != b.digest or not core.verified(b)
            or found[0].shape != (gallery.dimension, 2, gallery.params.slots)
            or found[0].dtype != residue_dtype(gallery.ctx.moduli[0])):
        return None
    centroid = None
    if b.sketch is not None:
        raw = core.sketch_key.decrypt(b.sketch, aad.sketch(gallery.collection_id,
                                                           gallery.key_version, b.block_no))
        centroid = np.frombuffer(raw, np.float32).copy()
    return Block(b.block_no, b.kind, b.generation, b.fill, b.levels, found[0], b.digest,
                 np.full(gallery.params.slots, -1, np.int32), centroid)


def load_block(core: Core, gallery: CollectionGallery, b: BlockRow) -> Block | None:
    """One block generation read and checked (not installed); None when it is bad."""
    return _checked_block(core, gallery, b, _read_block(core, gallery, b))


def _load_blocks(core: Core, gallery: CollectionGallery) -> int:
    """Install every block whose row MAC and file digest agree; returns the bad ones."""
    rows = core.store.blocks(gallery.collection_id, gallery.key_version)
    with ThreadPoolExecutor(max_workers=4) as pool:
        loaded = list(pool.map(lambda b: _read_block(core, gallery, b), rows))
    bad = 0
    for b, found in zip(rows, loaded):
        block = _checked_block(core, gallery, b, found)
        if block is None:
            bad += 1
        else:
            gallery.install_block(block)
    return bad


def load_page(core: Core, gallery: CollectionGallery, p: PageRow) -> Page | None:
    """One journal page checked and unpacked (not installed); None when it is bad."""
    if not core.verified(p):
        return None
    try:
        levels = page_ops.packed_levels(p.ciphertext, gallery.params.slots, gallery.ctx.moduli)
        ct = page_ops.unpack(p.ciphertext, levels, gallery.params.slots, gallery.ctx.moduli)
    except ValueError:
        return None
    return Page(p.page_no, p.generation, p.fill, ct, np.full(gallery.page_slots, -1, np.int32))


def _load_pages(core: Core, gallery: CollectionGallery) -> int:
    bad = 0
    for p in core.store.pages(gallery.collection_id, gallery.key_version):
        page = load_page(core, gallery, p)
        if page is None:
            bad += 1
        else:
            gallery.install_page(page)
    return bad


def _load_templates(core: Core, gallery: CollectionGallery) -> int:
    """Mark live slots. A template whose holder is missing or damaged, whose slot is
    beyond its holder's fill (an old holder state replayed), or that shares its slot
    with another (a swapped place) never matches. MACs of template rows are checked
    where it matters, before anything about a subject is released."""
    seen: set[tuple[int, int, int]] = set()
    bad = 0
    for subject_hmac, tier, loc, slot in core.store.live_places(gallery.collection_id,
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


def load(core: Core) -> None:
    """Load every collection and unfinished rotation; remove block files no row names."""
    for row in core.store.collections():
        load_collection(core, row)
    load_rotations(core)
    keep = {core.files.path(c, v, b, g) for c, v, b, g in core.store.all_block_generations()}
    swept = core.files.sweep(keep)
    if swept:
        log.warning("removed block files no committed row names (interrupted writes)",
                    count=swept)
