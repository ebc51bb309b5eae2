"""Collection key rotation: a new transform and new CKKS keys, and every stored template
moved under them without the original captures and without decrypting any template.

Per block of the old key version, as a background job:

1. the matcher masks the block's D ciphertexts with integers uniform in
   [M, q0 - M), M = ``lift_margin`` above any plaintext coefficient;
2. the decider decrypts them under the old secret key (it sees ``m + R``, within
   statistical distance 2M/q0 = 2^-11 per coefficient of uniform, 2^-21 for a legacy
   50-bit prime), reduces each value mod both data primes of the new key and encrypts it
   afresh under the **new** public key: a blind key switch that also lifts the
   ciphertexts from the score prime to both primes;
3. the matcher subtracts the mask, applies the change of transform
   ``round(q1 * Q_new @ Q_old.T * Dt_new / Dt_old)`` as a linear map across the D
   ciphertexts (:mod:`vault.he.linear`), and rescales by the rotation prime q1: the
   templates are now ``Q_new x`` (to about 2^-31) under the new key, at the score prime,
   at the new template scale, as stored.

The new version takes the vault's current parameters (:data:`vault.he.DEFAULT_PARAMS`):
a rotation is also how a collection written with the 50-bit layout moves to the 32-bit
one. Each rotation leaves the ciphertexts at one prime and adds two fresh noises (the
encryption and the rescale's rounding) to the plaintext: see the budget in
:mod:`vault.he.params`. Matching goes on under the old version
while the job runs; journal pages are checkpointed into blocks before the last blocks
move; then, in one transaction, the collection switches to the new version, its minimum
key version rises to it, and every row of the old version is deleted (its block files
zero-filled). The job is resumable: a block whose new-version row names the generation of
its old-version source is done; anything else is moved (again) after a restart.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid

import numpy as np

from vault import loading, logs
from vault.core import Core, check_revision
from vault.crypto.reencrypt import blind_reencrypt
from vault.decider import Moves
from vault.domain.errors import DataLoss, FailedPrecondition, NotFound, VaultError
from vault.domain.records import (
    BLOCK,
    FAILED,
    LIVE,
    RUNNING,
    CollectionKeyRow,
    CollectionRow,
    KeyJobRow,
)
from vault.gallery import CollectionGallery
from vault.gallery import blocks as block_ops
from vault.he import linear
from vault.ops.commit import BlockCommit, check_stored
from vault.ops.maintenance import checkpoint

log = logs.get("vault.rotation")

# Seconds a job waits after a token outage (or other unavailability) before going on.
RETRY_SECONDS = 5.0


def start(core: Core, collection_id: str) -> KeyJobRow:
    """Create the next key version of a collection and start moving templates to it.

    A failed job for the collection is resumed rather than started again."""
    try:
        current: tuple[CollectionRow, CollectionGallery] | None = core.current(collection_id)
    except FailedPrecondition:
        # Below its minimum key version (raised to this job's target while it ran): the
        # collection serves nothing until the job switches, so a failed one may resume.
        current = None
    with core.jobs_lock:
        job = core.store.unfinished_job(collection_id)
        if current is None and job is None:
            current = core.current(collection_id)  # refused, as it was
        if job is not None:
            if job.state == RUNNING and job.job_id in core.job_threads:
                raise FailedPrecondition("a key rotation is already running for this collection")
            resumed = dataclasses.replace(job, state=RUNNING, error=None)
            core.store.finish_job(job.job_id, RUNNING)
            launch(core, resumed)
            return resumed
        assert current is not None
        row, gallery = current
        new_version = row.key_version + 1
        params = core.params  # the current layout: a rotation migrates an older one
        core.memory.require(len(gallery.blocks) * block_ops.held_bytes(gallery.dimension, params),
                            "a key rotation of this collection (its new key version's blocks "
                            "are held next to the old ones until the switch)")
        public, sealed = core.decider.create_key(collection_id, new_version, params)
        params_json = params.to_json()
        job = KeyJobRow(uuid.uuid4().hex, collection_id, row.key_version, new_version, RUNNING, 0,
                        len(gallery.blocks), None)
        core.store.insert_key_version(CollectionKeyRow(collection_id, new_version, params_json,
                                                        public, sealed), job)
        core.next_galleries[collection_id] = CollectionGallery(
            collection_id, new_version, row.dimension, params, public, core.tuning.routing, core.shards)
        launch(core, job)
    log.info("key rotation started", collection_id=collection_id, version=new_version,
             blocks_total=job.blocks_total)
    return job


def launch(core: Core, job: KeyJobRow) -> None:
    """Run ``job`` in its own registered thread (the caller holds ``core.jobs_lock``)."""
    thread = threading.Thread(target=run, args=(core, job), name=f"rotation-{job.job_id[:8]}",
                              daemon=True)
    core.job_threads[job.job_id] = thread
    thread.start()


def pending(old: CollectionGallery, new: CollectionGallery) -> list[int]:
    """Old-version blocks not yet moved, or changed since they were."""
    return sorted(b for b, block in list(old.blocks.items())
                  if b not in new.blocks or new.blocks[b].generation != block.generation)


def run(core: Core, job: KeyJobRow) -> None:
    """The job's thread: move blocks until few are left, then switch. Token outages are
    waited out in this same thread (a relaunched thread raced its predecessor's clean-up,
    which unregistered it, and a second rotation of the job was then accepted); any other
    failure marks the job failed (``rotate`` resumes it)."""
    cid = job.collection_id
    try:
        # A primary that lost the write lease leaves: the new primary resumes the job.
        while not core.stopping.is_set() and core.may_write():
            try:
                if _advance(core, job):
                    return
            except VaultError as exc:
                if isinstance(exc, DataLoss):
                    raise  # damaged data does not heal by waiting: the job fails
                log.warning("key rotation paused", collection_id=cid, error_type=type(exc).__name__)
                core.stopping.wait(RETRY_SECONDS)
    except Exception as exc:  # noqa: BLE001 - the job must record why it stopped
        log.error("key rotation failed", collection_id=cid, error_type=type(exc).__name__)
        core.store.finish_job(job.job_id, FAILED, type(exc).__name__)
    finally:
        with core.jobs_lock:
            if core.job_threads.get(job.job_id) is threading.current_thread():
                del core.job_threads[job.job_id]


def _advance(core: Core, job: KeyJobRow) -> bool:
    """One round of a job: move the pending blocks, or switch when one is left. True when
    the job is over (switched, or the vault is stopping)."""
    cid = job.collection_id
    old = core.gallery(cid, job.from_version)
    new = core.next_galleries.get(cid)
    if old is None or new is None:
        raise NotFound("the collection's key versions are not loaded")
    todo = pending(old, new)
    if len(todo) <= 1:
        return switch(core, job, old, new)
    for block_no in todo:
        if core.stopping.is_set():
            return True
        move_block(core, job, old, new, block_no)
    return False


def move_block(core: Core, job: KeyJobRow, old: CollectionGallery, new: CollectionGallery,
               block_no: int) -> None:
    """Move one block to the new key version (see the module docstring)."""
    cid = job.collection_id
    moduli = new.ctx.moduli
    # Short of memory, the job pauses (run() retries) rather than the OOM killer ending it.
    core.memory.require(block_ops.held_bytes(new.dimension, new.params), "a key rotation's next block")
    with old.block_lock:
        block = old.blocks.get(block_no)
        if block is None or old.retired:
            return
        cts = core.read_block(old, block)  # (D, 2, 1, N)
        dim, n = cts.shape[0], cts.shape[3]
        every = np.arange(n)
        moves = Moves(dim, np.repeat(np.arange(dim), n), np.tile(every, dim),
                      np.repeat(np.arange(dim), n), np.tile(every, dim))
        # Masked at the old prime, lifted to the new key's primes (an older layout migrates).
        fresh = blind_reencrypt(core.decider, old.ctx, cid, old.key_version, cts, False, moves,
                                new.key_version, lift_to=moduli, margin=old.params.lift_margin)
        del cts
        change = core.decider.change(cid, old.key_version, new.key_version, old.dimension)
        # The rescale by q1 also moves the templates from the old scale to the new one.
        scale = moduli[1] * new.params.template_scale / old.params.template_scale
        rotated = linear.rescale(linear.linear_map(
            fresh, np.rint(change * scale).astype(np.int64), moduli), moduli)
        del fresh
        centroid = None
        if block.centroid is not None:
            turned = change @ block.centroid.astype(np.float64)
            centroid = (turned / np.linalg.norm(turned)).astype(np.float32)
        with BlockCommit(core, new) as unit:  # files, transaction, install, retire
            moved = unit.write(block_no, block.kind, block.generation, block.fill, rotated,
                               moduli[:1], centroid=centroid)
            del rotated
            replaced = new.blocks.get(block_no)
            if replaced is not None:  # an earlier move of this block (a resumed job)
                unit.replaces(block_no, replaced.generation)
            with old.write_lock:  # deletions meanwhile are in the rows read here
                stored = core.store.templates_in(cid, old.key_version, BLOCK, block_no)
                check_stored(core, cid, stored)
                rows = [core.sign(dataclasses.replace(t, key_version=new.key_version, mac=b""))
                        for t in stored]
                sketch = (core.seal_sketch(cid, new.key_version, block_no, centroid)
                          if centroid is not None else None)
                done = len(new.blocks) + (0 if block_no in new.blocks else 1)
                unit.commit(lambda: core.store.write_moved_block(
                    core.block_row(new, moved, moved.digest, sketch), rows, job.job_id, done,
                    len(old.blocks)))
                for t in rows:  # owners from the rows: an earlier move of this block is stale
                    if t.state == LIVE:
                        moved.groups[t.slot] = new.group(t.subject_hmac)
                new.install_block(moved, keep_owners=False)
    log.info("key rotation progress", collection_id=cid, version=new.key_version,
             blocks_done=done, blocks_total=len(old.blocks))


def switch(core: Core, job: KeyJobRow, old: CollectionGallery, new: CollectionGallery) -> bool:
    """Checkpoint the old journal, move what is left, and make the new version current.
    False when writes slipped in meanwhile (the caller goes round again)."""
    cid = job.collection_id
    with old.block_lock:
        checkpoint(core, old)
        for block_no in pending(old, new):
            move_block(core, job, old, new, block_no)
        with old.write_lock:
            if old.pages or pending(old, new):
                return False
            row = core.store.collection(cid)
            if row is None:
                raise NotFound("collection not found")
            core.release_settings(row)  # a tampered row is DATA_LOSS, never signed afresh
            check_revision(core, row, old)  # and so is an older copy put back
            # The set moved is the set committed to, as at load: a row deleted, restored
            # from an older copy or replayed (valid MACs each) is not carried forward.
            loading.check_live_set(core, cid, old.key_version)
            if cid in core.damage_reasons:
                raise DataLoss(core.damage_reasons[cid])
            current = core.sign(dataclasses.replace(
                row, key_version=new.key_version,
                min_key_version=max(row.min_key_version, new.key_version),
                revision=row.revision + 1, mac=b""))
            with core.switch_lock:
                core.store.switch_key_version(current, old.key_version, job.job_id)
                new.row_revision = current.revision
                old.retired = True
                core.install_current(cid, new)
        for block in old.blocks.values():
            core.retire(core.files.path(cid, old.key_version, block.block_no, block.generation),
                         erase=True)
    core.retire_key_version(cid, old.key_version)
    log.info("key rotation done", collection_id=cid, version=new.key_version,
             template_count=new.template_count())
    return True
