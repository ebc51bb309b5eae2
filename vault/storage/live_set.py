"""The live-set commitment of each (collection, key version), kept inside every write
transaction: what a row deleted, restored or replayed behind the vault's back changes."""

from __future__ import annotations

from typing import Any

from vault.domain.errors import DataLoss
from vault.domain.records import (
    BLOCK,
    LIVE,
    PAGE,
    TemplateRow,
)
from vault.keys.integrity import LiveSet
from vault.storage.connection import Connection

# The store-wide epoch's row in collection_state: no collection has an empty id.
EPOCH_ROW = ("", 0)
# The key version of a collection's attempt-set commitment in collection_state: its
# verify_attempts rows, so that deleting one (a lock lifted) is detected like a template.
ATTEMPT_SET = -1


class LiveSetLedger(Connection):
    """Leaves of the live rows, folded into the MACed commitment at each commit."""

    # -- live-set commitments -------------------------------------------------------------

    def _change(self, collection_id: str, key_version: int, delta: int) -> None:
        key = (collection_id, key_version)
        self._delta[key] = self._delta.get(key, 0) + delta

    def _template_leaf(self, row: tuple[Any, ...]) -> int:
        """``row``: (template_id, collection_id, subject_hmac, key_version, tier, loc,
        slot, mac) of a live template."""
        assert self.live_set is not None
        tid, cid, subject_hmac, version, tier, loc, slot, mac = row
        return self.live_set.template(cid, version, tid, subject_hmac, tier, loc, slot, mac)

    _LEAF_COLUMNS = "template_id, collection_id, subject_hmac, key_version, tier, loc, slot, mac"

    def _forget_template(self, db: Any, template_id: str, key_version: int) -> None:
        """Take a stored template row out of its commitment, if it is live (before it is
        updated, replaced or deleted)."""
        found = db.execute(f"SELECT {self._LEAF_COLUMNS} FROM templates WHERE template_id=? "
                           "AND key_version=? AND state=?", (template_id, key_version, LIVE)).fetchone()
        if found is not None:
            self._touch(found[1], found[3], found[4], found[5])
            self._change(found[1], found[3], -self._template_leaf(found))

    def _add_template(self, t: TemplateRow) -> None:
        self._touch(t.collection_id, t.key_version, t.tier, t.loc)
        if t.state == LIVE:
            self._change(t.collection_id, t.key_version, self._template_leaf(
                (t.template_id, t.collection_id, t.subject_hmac, t.key_version, t.tier, t.loc,
                 t.slot, t.mac)))

    def _holder_leaf(self, cid: str, version: int, tier: int, loc: int, generation: int,
                     mac: bytes) -> int:
        assert self.live_set is not None
        return self.live_set.holder(cid, version, tier, loc, generation, mac)

    def _forget_holder(self, db: Any, tier: int, cid: str, version: int,
                       loc: int) -> None:
        table, column = ("pages", "page_no") if tier == PAGE else ("blocks", "block_no")
        self._touch(cid, version, tier, loc)
        found = db.execute(f"SELECT generation, mac FROM {table} WHERE collection_id=? AND "
                           f"key_version=? AND {column}=?", (cid, version, loc)).fetchone()
        if found is not None:
            self._change(cid, version, -self._holder_leaf(cid, version, tier, loc, *found))

    def _collection_leaf(self, collection_id: str, key_version: int, revision: int,
                         mac: bytes) -> int:
        """A collection row's leaf in its key version's set (none before revisions)."""
        assert self.live_set is not None
        return self.live_set.collection_row(collection_id, key_version, revision, mac) if revision else 0

    def _forget_collection_row(self, db: Any, collection_id: str) -> None:
        """Take the stored collection row out of its commitment (before it is replaced)."""
        found = db.execute("SELECT key_version, revision, mac FROM collections WHERE "
                           "collection_id=?", (collection_id,)).fetchone()
        if found is not None and found[1]:
            self._change(collection_id, found[0], -self._collection_leaf(collection_id, *found))

    def _add_collection_row(self, collection_id: str, key_version: int, revision: int,
                            mac: bytes) -> None:
        if revision:
            self._change(collection_id, key_version,
                         self._collection_leaf(collection_id, key_version, revision, mac))

    def _new_state(self, db: Any, collection_id: str, key_version: int) -> None:
        assert self.live_set is not None
        digest = bytes(32)
        db.execute("INSERT INTO collection_state VALUES (?,?,?,?,?)",
                   (collection_id, key_version, 0, digest,
                    self.live_set.seal(collection_id, key_version, 0, digest)))

    def _commit_states(self, db: Any) -> None:
        """Fold this transaction's changes into the state rows it touched (checked first:
        a state row changed behind the vault's back is not built upon), and count one more
        store epoch (:meth:`epoch`)."""
        delta, self._delta = self._delta, {}
        if delta:
            delta[EPOCH_ROW] = 0
        for (cid, version), change in delta.items():
            assert self.live_set is not None
            found = db.execute("SELECT counter, digest, mac FROM collection_state WHERE "
                               "collection_id=? AND key_version=?", (cid, version)).fetchone()
            if found is None and (cid, version) == EPOCH_ROW:
                self._new_state(db, cid, version)  # a first write (a deleted row restarts at 1:
                found = (0, bytes(32), None)       # below the token's count, see epoch())
            elif found is None or not self.live_set.check(found[2], cid, version, found[0], found[1]):
                raise DataLoss("the collection's live-set commitment is missing or failed its "
                               "integrity check; nothing was written")
            counter, digest = found[0] + 1, LiveSet.add(found[1], change)
            db.execute("UPDATE collection_state SET counter=?, digest=?, mac=? WHERE "
                       "collection_id=? AND key_version=?",
                       (counter, digest, self.live_set.seal(cid, version, counter, digest),
                        cid, version))

    def epoch(self, verify: bool = True) -> int:
        """How many write transactions changed a live set, ever: a MACed counter that only
        rises. The token keeps its value at each signed audit checkpoint
        (:mod:`vault.custody`), so a ``vault.db`` restored from an older copy, even beside the
        current audit log, is refused at start. ``verify=False``: without the MAC check (an
        admin accepting a restore, before the vault's keys are open)."""
        state = self.live_set_state(*EPOCH_ROW)
        if state is None:
            return 0
        counter, digest, mac = state
        if verify:
            assert self.live_set is not None
            if not self.live_set.check(mac, *EPOCH_ROW, counter, digest):
                raise DataLoss("the store's epoch counter failed its integrity check")
        return int(counter)

    def live_set_state(self, collection_id: str, key_version: int) -> tuple[int, bytes, bytes] | None:
        """(counter, digest, MAC) of a key version's commitment, if stored."""
        rows = self._query("SELECT counter, digest, mac FROM collection_state WHERE "
                           "collection_id=? AND key_version=?", (collection_id, key_version))
        return rows[0] if rows else None

    def live_set_digest(self, collection_id: str, key_version: int) -> bytes:
        """The commitment recomputed from every stored live template, page and block row."""
        args = (collection_id, key_version)
        total = sum(self._template_leaf(r) for r in self._query(
            f"SELECT {self._LEAF_COLUMNS} FROM templates WHERE collection_id=? AND key_version=? "
            "AND state=?", args + (LIVE,)))
        for tier, table, column in ((PAGE, "pages", "page_no"), (BLOCK, "blocks", "block_no")):
            total += sum(self._holder_leaf(collection_id, key_version, tier, loc, generation, mac)
                         for loc, generation, mac in self._query(
                             f"SELECT {column}, generation, mac FROM {table} WHERE collection_id=? "
                             "AND key_version=?", args))
        total += sum(self._collection_leaf(collection_id, key_version, revision, mac)
                     for revision, mac in self._query(
                         "SELECT revision, mac FROM collections WHERE collection_id=? AND "
                         "key_version=?", args))
        return LiveSet.add(bytes(32), total)

    def subjects_missing(self, collection_id: str, key_version: int) -> int:
        """Subjects with a live template but no sealed id row (a deleted subjects row)."""
        return int(self._query(
            "SELECT COUNT(DISTINCT t.subject_hmac) FROM templates t LEFT JOIN subjects s ON "
            "s.collection_id=t.collection_id AND s.subject_hmac=t.subject_hmac WHERE "
            "t.collection_id=? AND t.key_version=? AND t.state=? AND s.subject_hmac IS NULL",
            (collection_id, key_version, LIVE))[0][0])
