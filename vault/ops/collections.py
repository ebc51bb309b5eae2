"""Creating and describing collections (each with its own CKKS key pair)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vault import logs
from vault.core import Core
from vault.domain.errors import (
    AlreadyExists,
    InvalidArgument,
)
from vault.domain.model import CollectionInfo, CollectionPolicy
from vault.domain.records import (
    CollectionKeyRow,
    CollectionRow,
)
from vault.gallery import CollectionGallery
from vault.ops import collection_key
from vault.protector import validate_reference_mean
from vault.validation import (
    check_collection_id,
    check_dimension,
    check_threshold,
)

log = logs.get("vault.ops.collections")


def create_collection(core: Core, collection_id: str, dimension: int, threshold: float | None,
                      reference_mean: Sequence[float] = (),
                      require_purpose: bool = False) -> CollectionInfo:
    """New collection with its own CKKS key pair and transform key version 1.

    ``threshold`` is required (None: INVALID_ARGUMENT). ``reference_mean``: the
    embedding model's public population mean of normalised embeddings; every embedding
    is centred on it (vault.protector, wolves), so the threshold applies to the cosine
    of centred embeddings. Without one the collection is exposed to wolves.
    ``require_purpose``: every 1:N identification must give a purpose."""
    core.require_primary()  # a standby replica changes no gallery state
    check_collection_id(collection_id)
    check_dimension(dimension)
    if threshold is None:
        raise InvalidArgument("threshold is required: the decision threshold on cosine "
                              "similarity, in [-1, 1]")
    threshold = check_threshold(threshold)
    mean = validate_reference_mean(reference_mean, dimension)
    mean_bytes = None if mean is None else mean.astype("<f8").tobytes()
    with core.create_lock:
        if core.store.collection(collection_id) is not None:
            raise AlreadyExists("collection already exists")
        # The decider makes the key pair and seals the secret itself; only the public
        # context and the sealed blob come back.
        public, sealed = core.decider.create_key(collection_id, 1, core.params)
        params_json = core.params.to_json()
        policy = CollectionPolicy(require_purpose=bool(require_purpose))
        row = core.sign(CollectionRow(collection_id, dimension, threshold, 1, 1, b"",
                                      mean_bytes, policy.to_json(), revision=1))
        gallery = CollectionGallery(collection_id, 1, dimension, core.params, public,
                                    core.tuning.routing, core.shards)
        try:
            core.store.insert_collection(row, CollectionKeyRow(collection_id, 1, params_json,
                                                               public, sealed))
        except BaseException:
            core.decider.forget(collection_id, 1)
            raise
        core.current_galleries[collection_id] = gallery
    log.info("collection created", collection_id=collection_id, dimension=dimension,
             status="centred" if mean is not None else "no_reference_mean")
    return CollectionInfo(collection_id, dimension, threshold, 1, 0, 1, policy.require_purpose)


def get_collection(core: Core, collection_id: str) -> CollectionInfo:
    """A serving collection's settings and template count."""
    row, gallery = core.current(collection_id)
    return CollectionInfo(row.collection_id, row.dimension, row.threshold, row.key_version,
                          gallery.template_count(), row.min_key_version,
                          CollectionPolicy.from_json(row.policy).require_purpose)


def get_collection_info(core: Core, collection_id: str) -> CollectionInfo:
    """As :meth:`get_collection`, also for a collection stopped by its minimum key
    version (what the key administrator needs to see)."""
    row, _versions, _job = collection_key.key_versions(core, collection_id)
    core.release_settings(row)  # its MAC: DATA_LOSS for a tampered row, never shown as fine
    gallery = core.current_galleries.get(collection_id)
    count = gallery.template_count() if gallery is not None else 0
    return CollectionInfo(row.collection_id, row.dimension, row.threshold, row.key_version,
                          count, row.min_key_version,
                          CollectionPolicy.from_json(row.policy).require_purpose)


def update_collection(core: Core, collection_id: str, threshold: float | None = None,
                      require_purpose: bool | None = None) -> CollectionInfo:
    """Change a collection's threshold or purpose requirement (the admin's call; the
    API audits it with the new values). Matches in flight finish under the old row."""
    core.require_primary()  # a standby replica changes no gallery state
    if threshold is None and require_purpose is None:
        raise InvalidArgument("nothing to update: set threshold or require_purpose")
    threshold = None if threshold is None else check_threshold(threshold)
    _, gallery = core.current(collection_id)
    # The gallery's write lock: a key rotation's switch signs the row it read under it.
    with core.create_lock, gallery.write_lock:
        row, _ = core.current(collection_id)
        policy = CollectionPolicy.from_json(row.policy)
        if require_purpose is not None:
            policy = dataclasses.replace(policy, require_purpose=bool(require_purpose))
        updated = core.sign(dataclasses.replace(
            row, threshold=row.threshold if threshold is None else threshold,
            policy=policy.to_json(), revision=row.revision + 1, mac=b""))
        core.store.update_collection(updated)
        gallery.row_revision = max(gallery.row_revision, updated.revision)
    log.info("collection updated", collection_id=collection_id)
    return get_collection(core, collection_id)
