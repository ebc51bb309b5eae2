"""The vault as the API sees it: :class:`Vault`, the roles of :class:`vault.core.Core` with
every operation of :mod:`vault.ops` attached, opened on a data directory and a token.

Each operation is a function of a Core in its own module (one owner per operation); this
class only names them, so it stays a table of contents rather than a second home for them.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

from vault import custody, loading
from vault.attempts import AttemptLimits
from vault.audit import AuditLog
from vault.core import Core, Tuning
from vault.domain.model import Candidate, CollectionInfo, CollectionPolicy, MatchResult, Observer
from vault.domain.records import RUNNING
from vault.keys.hsm import Hsm, HsmConfig
from vault.keys.roles import HsmRoles
from vault.ops import (
    collection_admin,
    collection_key,
    collections,
    delete,
    enroll,
    maintenance,
    master_key,
    match,
    rotation,
)
from vault.ops.imports import ImportSession
from vault.store import Store

__all__ = ["AttemptLimits", "Candidate", "CollectionInfo", "CollectionPolicy", "MatchResult",
           "Observer", "Tuning", "Vault"]


class Vault(Core):
    """Enroll, import, match and delete over encrypted templates; keys in the HSM."""

    def __init__(self, store: Store, hsm: HsmRoles, data_dir: Path, **kwargs: Any) -> None:
        super().__init__(store, hsm, data_dir, **kwargs)
        loading.load(self)

    @classmethod
    def open(cls, data_dir: Path, hsm_config: HsmConfig, store_url: str | None = None,
             **kwargs: Any) -> Vault:
        """Open (creating if needed) the vault whose database lives in ``data_dir`` (or at
        ``store_url``, a PostgreSQL database), with its audit log in ``data_dir``, and start
        its maintenance thread."""
        data_dir.mkdir(parents=True, exist_ok=True)  # the audit log's, with either store
        store = Store(store_url or data_dir / "vault.db")
        try:
            vault = cls(store, Hsm(hsm_config), data_dir, **kwargs)
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
        if vault.store.engine.feeds_changes:  # PostgreSQL: replicas may share the database
            from vault.ops.follow import Replica

            vault.replica = Replica(vault, custody.node_id(data_dir), vault.feed_start,
                                    vault.tuning.lease_ttl, vault.tuning.refresh_interval,
                                    on_promote=vault.resume_rotations)
            try:
                vault.replica.start()
            except BaseException:
                vault.close()
                raise
        vault.start_maintenance()
        if vault.may_write():
            vault.resume_rotations()
        return vault

    def start_maintenance(self) -> None:
        """Run checkpoints, erasure and file clean-up in the background."""
        if self.tuning.maintenance_interval <= 0 or self.maintenance is not None:
            return
        self.maintenance = threading.Thread(target=maintenance.run_forever,
                                            args=(self, self.stopping),
                                            name="vault-maintenance", daemon=True)
        self.maintenance.start()

    def resume_rotations(self) -> None:
        """Restart the threads of key rotations that were running when the vault stopped."""
        with self.jobs_lock:
            for job in self.store.key_jobs(RUNNING):
                if job.job_id not in self.job_threads and job.collection_id in self.next_galleries:
                    rotation.launch(self, job)

    def maintain(self, force: bool = False) -> None:
        """One maintenance pass now (``force``: checkpoint and erase whatever is pending)."""
        maintenance.run_once(self, force=force)

    def start_import(self, collection_id: str) -> ImportSession:
        """A bulk import session (:mod:`vault.ops.imports`)."""
        return ImportSession(self, collection_id)

    create_collection = collections.create_collection
    get_collection = collections.get_collection
    get_collection_info = collections.get_collection_info
    update_collection = collections.update_collection
    list_collections = collection_admin.list_collections
    delete_collection = collection_admin.delete_collection
    enroll = enroll.enroll
    verify = match.verify
    identify = match.identify
    unlock_subject = match.unlock_subject
    audit_subject_ref = match.audit_subject_ref
    delete_subject = delete.delete_subject
    rotate_master_key = master_key.rotate_master_key
    rewrap_keys = master_key.rewrap_keys
    master_key_versions = master_key.master_key_versions
    rotate_collection_key = collection_key.rotate_collection_key
    key_job = collection_key.key_job
    key_versions = collection_key.key_versions
    set_min_key_version = collection_key.set_min_key_version
