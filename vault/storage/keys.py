"""Collections, their key versions, rotation jobs, wrapped keys and blobs, subjects."""

from __future__ import annotations

from typing import Any

from vault.domain.records import (
    DONE,
    CollectionKeyRow,
    CollectionRow,
    KeyJobRow,
)
from vault.storage.connection import COLLECTION_CHANGE
from vault.storage.live_set import ATTEMPT_SET, EPOCH_ROW, LiveSetLedger


class KeyRecords(LiveSetLedger):
    """Rows about collections and keys (no template values, no subject ids in clear)."""

    # -- meta and wrapped keys ------------------------------------------------------------

    def has_wrapped_keys(self) -> bool:
        """True once a key ceremony has wrapped anything into this database."""
        return bool(self._query("SELECT 1 FROM wrapped_keys LIMIT 1"))

    def wrapped_key(self, name: str, version: int) -> bytes | None:
        """A wrapped data key, None if it was never created."""
        rows = self._query("SELECT blob FROM wrapped_keys WHERE name=? AND version=?", (name, version))
        return rows[0][0] if rows else None

    def put_wrapped_key(self, name: str, version: int, blob: bytes) -> None:
        """Store a newly wrapped data key."""
        with self.transaction() as db:
            db.execute("INSERT INTO wrapped_keys(name, version, blob) VALUES (?,?,?)",
                       (name, version, blob))

    # -- collections ---------------------------------------------------------------------

    def _collection_changed(self, collection_id: str) -> None:
        """This transaction changes a collection's own rows (replicas reload them)."""
        self._touch(collection_id, 0, COLLECTION_CHANGE, 0)

    _COLLECTION_COLUMNS = ("collection_id, dimension, threshold, key_version, min_key_version, mac, "
                           "reference_mean, policy, revision")

    def collection(self, collection_id: str) -> CollectionRow | None:
        """A collection row as stored (its MAC is checked by the caller)."""
        rows = self._query(f"SELECT {self._COLLECTION_COLUMNS} FROM collections "
                           "WHERE collection_id=?", (collection_id,))
        return CollectionRow(*rows[0]) if rows else None

    def collections(self) -> list[CollectionRow]:
        """Every collection row, by id."""
        return [CollectionRow(*r) for r in self._query(
            f"SELECT {self._COLLECTION_COLUMNS} FROM collections ORDER BY collection_id")]

    # Every table with a collection_id column: what a deleted collection leaves behind.
    _COLLECTION_TABLES = ("templates", "subjects", "pages", "blocks", "verify_attempts",
                          "key_jobs", "collection_state", "collection_keys", "collections")

    def delete_collection(self, collection_id: str) -> tuple[int, list[int]]:
        """Delete every row of a collection in one transaction (``secure_delete`` zeroes
        the freed pages); returns its template count and the key versions it held."""
        with self.transaction() as db:
            (templates,) = db.execute("SELECT COUNT(DISTINCT template_id) FROM templates "
                                      "WHERE collection_id=?", (collection_id,)).fetchone()
            versions = [v for (v,) in db.execute(
                "SELECT key_version FROM collection_keys WHERE collection_id=?", (collection_id,))]
            for table in self._COLLECTION_TABLES:
                db.execute(f"DELETE FROM {table} WHERE collection_id=?", (collection_id,))
            self._collection_changed(collection_id)
            self._change(*EPOCH_ROW, 0)  # one more store epoch: a rollback would bring it back
        return int(templates), versions

    def insert_collection(self, row: CollectionRow, key: CollectionKeyRow) -> None:
        """A new collection with its first key version, in one transaction."""
        with self.transaction() as db:
            db.execute("INSERT INTO collections(collection_id, dimension, threshold, key_version, "
                       "min_key_version, mac, reference_mean, policy, revision) "
                       "VALUES (?,?,?,?,?,?,?,?,?)",
                       (row.collection_id, row.dimension, row.threshold, row.key_version,
                        row.min_key_version, row.mac, row.reference_mean, row.policy, row.revision))
            self._put_collection_key(db, key)
            self._add_collection_row(row.collection_id, row.key_version, row.revision, row.mac)
            self._new_state(db, row.collection_id, ATTEMPT_SET)
            self._collection_changed(row.collection_id)

    def _put_collection_key(self, db: Any, key: CollectionKeyRow) -> None:
        """A key version, and its (empty) live-set commitment."""
        db.execute("INSERT INTO collection_keys VALUES (?,?,?,?,?)",
                   (key.collection_id, key.key_version, key.he_params, key.public_context,
                    key.sealed_secret_context))
        self._new_state(db, key.collection_id, key.key_version)

    def collection_key(self, collection_id: str, key_version: int) -> CollectionKeyRow | None:
        """A key version's parameters, public context and sealed secret context."""
        rows = self._query(
            "SELECT collection_id, key_version, he_params, public_context, sealed_secret_context "
            "FROM collection_keys WHERE collection_id=? AND key_version=?", (collection_id, key_version))
        return CollectionKeyRow(*rows[0]) if rows else None

    # -- subjects ------------------------------------------------------------------------

    def sealed_subject_id(self, collection_id: str, subject_hmac: bytes) -> bytes | None:
        """A subject's sealed id, None when it has none (unknown or deleted)."""
        rows = self._query("SELECT sealed_subject_id FROM subjects WHERE collection_id=? AND subject_hmac=?",
                           (collection_id, subject_hmac))
        return rows[0][0] if rows else None

    # -- key jobs and key versions ----------------------------------------------------

    _JOB_COLUMNS = ("job_id, collection_id, from_version, to_version, state, blocks_done, "
                    "blocks_total, error")

    def insert_key_version(self, key: CollectionKeyRow, job: KeyJobRow) -> None:
        """A new key version of a collection, and the job that moves templates to it."""
        with self.transaction() as db:
            self._put_collection_key(db, key)
            db.execute(f"INSERT INTO key_jobs({self._JOB_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                       (job.job_id, job.collection_id, job.from_version, job.to_version, job.state,
                        job.blocks_done, job.blocks_total, job.error))
            self._collection_changed(key.collection_id)

    def key_job(self, job_id: str) -> KeyJobRow | None:
        """A rotation job by id."""
        rows = self._query(f"SELECT {self._JOB_COLUMNS} FROM key_jobs WHERE job_id=?", (job_id,))
        return KeyJobRow(*rows[0]) if rows else None

    def key_jobs(self, state: str | None = None) -> list[KeyJobRow]:
        """Every rotation job (or those in ``state``), oldest first."""
        where, args = ("WHERE state=?", (state,)) if state else ("", ())
        return [KeyJobRow(*r) for r in self._query(
            f"SELECT {self._JOB_COLUMNS} FROM key_jobs {where} ORDER BY {self.engine.insert_order}", args)]

    def unfinished_job(self, collection_id: str) -> KeyJobRow | None:
        """The collection's rotation that is not done (running or failed), if any: there
        is at most one, since a new rotation resumes it rather than starting another."""
        rows = self._query(f"SELECT {self._JOB_COLUMNS} FROM key_jobs WHERE collection_id=? "
                           f"AND state!=? ORDER BY {self.engine.insert_order} DESC LIMIT 1", (collection_id, DONE))
        return KeyJobRow(*rows[0]) if rows else None

    def finish_job(self, job_id: str, state: str, error: str | None = None) -> None:
        """Set a job's state (and why it stopped)."""
        with self.transaction() as db:
            db.execute("UPDATE key_jobs SET state=?, error=? WHERE job_id=?", (state, error, job_id))
            for (cid,) in db.execute("SELECT collection_id FROM key_jobs WHERE job_id=?", (job_id,)).fetchall():
                self._collection_changed(cid)

    def collection_key_versions(self, collection_id: str) -> list[int]:
        """The key versions a collection holds, ascending."""
        return [r[0] for r in self._query("SELECT key_version FROM collection_keys "
                                          "WHERE collection_id=? ORDER BY key_version",
                                          (collection_id,))]

    def switch_key_version(self, row: CollectionRow, old_version: int, job_id: str) -> None:
        """One transaction: the collection moves to its new key version (row with its new
        MAC); every row of the old version goes; the job is done."""
        cid = row.collection_id
        with self.transaction() as db:
            # The old version's commitment goes below, the row's leaf with it.
            db.execute("UPDATE collections SET key_version=?, min_key_version=?, mac=?, revision=? "
                       "WHERE collection_id=?",
                       (row.key_version, row.min_key_version, row.mac, row.revision, cid))
            self._add_collection_row(cid, row.key_version, row.revision, row.mac)
            for table in ("templates", "blocks", "pages", "collection_keys", "collection_state"):
                db.execute(f"DELETE FROM {table} WHERE collection_id=? AND key_version=?",
                           (cid, old_version))
            db.execute("UPDATE key_jobs SET state='done' WHERE job_id=?", (job_id,))
            self._collection_changed(cid)

    def newest_key_version(self, collection_id: str) -> int:
        """The highest key version any row of the collection names."""
        return max((self._query(f"SELECT COALESCE(MAX(key_version), 0) FROM {t} "
                                "WHERE collection_id=?", (collection_id,))[0][0]
                    for t in ("collection_keys", "templates", "blocks", "pages")), default=0)

    def count_below(self, collection_id: str, key_version: int) -> int:
        """Rows of the collection under key versions below ``key_version``."""
        return sum(self._query(f"SELECT COUNT(*) FROM {t} WHERE collection_id=? AND key_version<?",
                               (collection_id, key_version))[0][0]
                   for t in ("collection_keys", "templates", "blocks", "pages"))

    def update_collection(self, row: CollectionRow) -> None:
        """Replace a collection row (already MACed by the caller)."""
        with self.transaction() as db:
            self._forget_collection_row(db, row.collection_id)
            db.execute("UPDATE collections SET threshold=?, key_version=?, min_key_version=?, mac=?, "
                       "policy=?, revision=? WHERE collection_id=?",
                       (row.threshold, row.key_version, row.min_key_version, row.mac, row.policy,
                        row.revision, row.collection_id))
            self._add_collection_row(row.collection_id, row.key_version, row.revision, row.mac)
            self._collection_changed(row.collection_id)

    # -- wrapped blobs (master key rotation) ----------------------------------------------

    def wrapped_blobs(self) -> list[tuple[str, tuple[str | int, ...], bytes]]:
        """Every blob that names a KEK version: ('data-key', (name, version), blob) and
        ('ckks-secret', (collection, version, params), sealed secret context)."""
        out: list[tuple[str, tuple[str | int, ...], bytes]] = [
            ("data-key", (name, version), blob) for name, version, blob in
            self._query("SELECT name, version, blob FROM wrapped_keys")]
        out += [("ckks-secret", (cid, version, params), blob) for cid, version, params, blob in
                self._query("SELECT collection_id, key_version, he_params, sealed_secret_context "
                            "FROM collection_keys")]
        return out

    def replace_wrapped_blobs(self, blobs: list[tuple[str, tuple[str | int, ...], bytes]]) -> None:
        """Write rewrapped blobs, all in one transaction."""
        with self.transaction() as db:
            for kind, key, blob in blobs:
                if kind == "data-key":
                    db.execute("UPDATE wrapped_keys SET blob=? WHERE name=? AND version=?",
                               (blob, *key))
                else:
                    db.execute("UPDATE collection_keys SET sealed_secret_context=? "
                               "WHERE collection_id=? AND key_version=?", (blob, key[0], key[1]))
                    self._collection_changed(str(key[0]))

    def all_block_generations(self) -> list[tuple[str, int, int, int]]:
        """(collection, key version, block, generation) of every committed block."""
        return self._query("SELECT collection_id, key_version, block_no, generation FROM blocks")
