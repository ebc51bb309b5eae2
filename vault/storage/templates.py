"""Templates, journal pages, blocks and verification attempts: where the encrypted values sit."""

from __future__ import annotations

from typing import Any

from vault.domain.records import (
    BLOCK,
    DELETED,
    LIVE,
    PAGE,
    BlockRow,
    PageRow,
    TemplateRow,
)
from vault.storage.attempts import AttemptRecords
from vault.storage.connection import upsert

_PAGE_UPSERT = upsert("pages", ("collection_id", "key_version", "page_no", "generation", "fill",
                                "ciphertext", "mac"), ("collection_id", "key_version", "page_no"))
_BLOCK_UPSERT = upsert("blocks", ("collection_id", "key_version", "block_no", "kind", "generation",
                                  "levels", "fill", "digest", "sketch", "mac"),
                       ("collection_id", "key_version", "block_no"))


# Literals, not parameters: the partial index templates_unerased (vault.storage.sqlite) is
# used only by a query whose terms name its own.
UNERASED_QUERY = ("SELECT DISTINCT tier, loc FROM templates WHERE collection_id=? "
                  f"AND key_version=? AND state = {DELETED:d} AND erased = 0")

class TemplateRecords(AttemptRecords):
    """Rows about templates and their holders; every change goes through the ledger."""

    # -- templates -----------------------------------------------------------------------

    _TEMPLATE_COLUMNS = ("template_id, collection_id, subject_hmac, key_version, tier, loc, slot, "
                         "request_hmac, state, erased, mac")

    def template_by_request(self, request_hmac: bytes) -> TemplateRow | None:
        """The newest key version's row of the template a request id made."""
        rows = self._query(f"SELECT {self._TEMPLATE_COLUMNS} FROM templates WHERE request_hmac=? "
                           "ORDER BY key_version DESC LIMIT 1", (request_hmac,))
        return TemplateRow(*rows[0]) if rows else None

    def existing_requests(self, request_hmacs: list[bytes]) -> set[bytes]:
        """Which of these request HMACs already name a template."""
        found: set[bytes] = set()
        for start in range(0, len(request_hmacs), 500):
            part = request_hmacs[start:start + 500]
            found.update(r[0] for r in self._query(
                f"SELECT request_hmac FROM templates WHERE request_hmac IN ({','.join('?' * len(part))})",
                tuple(part)))
        return found

    def enrolled_subjects(self, collection_id: str, subject_hmacs: list[bytes]) -> set[bytes]:
        """Which of these subjects have a live template in the collection."""
        found: set[bytes] = set()
        for start in range(0, len(subject_hmacs), 500):
            part = subject_hmacs[start:start + 500]
            found.update(r[0] for r in self._query(
                "SELECT DISTINCT subject_hmac FROM templates WHERE collection_id=? AND state=? "
                f"AND subject_hmac IN ({','.join('?' * len(part))})",
                (collection_id, LIVE, *part)))
        return found

    def subject_templates(self, collection_id: str, subject_hmac: bytes,
                          key_version: int | None = None) -> list[TemplateRow]:
        """The live template rows of a subject: of one key version, or of every version
        present (during a rotation a template has a row under each)."""
        version_clause = "" if key_version is None else " AND key_version=?"
        args = (collection_id, subject_hmac, LIVE) + (() if key_version is None else (key_version,))
        return [TemplateRow(*r) for r in self._query(
            f"SELECT {self._TEMPLATE_COLUMNS} FROM templates WHERE collection_id=? AND subject_hmac=? "
            f"AND state=?{version_clause} ORDER BY template_id, key_version", args)]

    def templates_in(self, collection_id: str, key_version: int, tier: int, loc: int) -> list[TemplateRow]:
        """Every template (live or deleted) of one page or block, by slot."""
        return [TemplateRow(*r) for r in self._query(
            f"SELECT {self._TEMPLATE_COLUMNS} FROM templates WHERE collection_id=? AND key_version=? "
            "AND tier=? AND loc=? ORDER BY slot", (collection_id, key_version, tier, loc))]

    def live_places(self, collection_id: str, key_version: int) -> list[tuple[bytes, int, int, int]]:
        """(subject HMAC, tier, loc, slot) of every live template: what a start-up loads.
        Plain tuples: a million rows should not become a million objects."""
        return self._query("SELECT subject_hmac, tier, loc, slot FROM templates "
                           "WHERE collection_id=? AND key_version=? AND state=?",
                           (collection_id, key_version, LIVE))

    def unerased(self, collection_id: str, key_version: int) -> list[tuple[int, int]]:
        """(tier, loc) of the pages and blocks still holding values of deleted templates
        (a tombstone row stays until its values are erased, then goes)."""
        return self._query(UNERASED_QUERY, (collection_id, key_version))

    def max_loc(self, collection_id: str, key_version: int, tier: int) -> int:
        """The highest page or block number any row names (-1 if none): template rows and
        the page or block rows themselves, loadable or not. New numbers start above it, so a
        damaged holder's row (the evidence) and its templates are never overwritten."""
        table, column = ("pages", "page_no") if tier == PAGE else ("blocks", "block_no")
        found = self._query(
            "SELECT MAX(n) FROM (SELECT MAX(loc) AS n FROM templates WHERE collection_id=? "
            "AND key_version=? AND tier=? "
            f"UNION ALL SELECT MAX({column}) FROM {table} WHERE collection_id=? AND key_version=?) AS m",
            (collection_id, key_version, tier, collection_id, key_version))[0][0]
        return -1 if found is None else int(found)

    def _insert_templates(self, db: Any, templates: list[TemplateRow]) -> None:
        db.executemany(
            "INSERT INTO templates VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [(t.template_id, t.collection_id, t.subject_hmac, t.key_version, t.tier, t.loc,
              t.slot, t.request_hmac, t.state, t.erased, t.mac) for t in templates])
        for t in templates:
            self._add_template(t)

    def _update_templates(self, db: Any, templates: list[TemplateRow]) -> None:
        for t in templates:
            self._forget_template(db, t.template_id, t.key_version)
            self._add_template(t)
        db.executemany(
            "UPDATE templates SET tier=?, loc=?, slot=?, state=?, erased=?, mac=? "
            "WHERE template_id=? AND key_version=?",
            [(t.tier, t.loc, t.slot, t.state, t.erased, t.mac, t.template_id, t.key_version)
             for t in templates])

    def _put_page(self, db: Any, page: PageRow) -> None:
        self._forget_holder(db, PAGE, page.collection_id, page.key_version, page.page_no)
        db.execute(_PAGE_UPSERT,
                   (page.collection_id, page.key_version, page.page_no, page.generation,
                    page.fill, page.ciphertext, page.mac))
        self._change(page.collection_id, page.key_version, self._holder_leaf(
            page.collection_id, page.key_version, PAGE, page.page_no, page.generation, page.mac))

    def _put_block(self, db: Any, block: BlockRow) -> None:
        self._forget_holder(db, BLOCK, block.collection_id, block.key_version, block.block_no)
        db.execute(_BLOCK_UPSERT,
                   (block.collection_id, block.key_version, block.block_no, block.kind,
                    block.generation, block.levels, block.fill, block.digest, block.sketch,
                    block.mac))
        self._change(block.collection_id, block.key_version, self._holder_leaf(
            block.collection_id, block.key_version, BLOCK, block.block_no, block.generation,
            block.mac))

    def write_templates(self, pages: list[PageRow], blocks: list[BlockRow],
                        templates: list[TemplateRow],
                        subjects: list[tuple[str, bytes, bytes]]) -> None:
        """One transaction: new page and block states, new template and subject rows
        (an enrollment, or one chunk of an import)."""
        with self.transaction() as db:
            for page in pages:
                self._put_page(db, page)
            for block in blocks:
                self._put_block(db, block)
            db.executemany("INSERT INTO subjects VALUES (?,?,?) ON CONFLICT DO NOTHING", subjects)
            self._insert_templates(db, templates)

    def write_relocation(self, blocks: list[BlockRow], moved: list[TemplateRow],
                         dropped_pages: list[tuple[str, int, int]],
                         erased: list[tuple[str, int]]) -> None:
        """One transaction: new block states, templates moved (their new rows), tombstones
        whose values were erased (template id, key version: the rows go), journal pages
        dropped (a checkpoint, a compaction)."""
        with self.transaction() as db:
            for block in blocks:
                self._put_block(db, block)
            self._update_templates(db, moved)
            db.executemany("DELETE FROM templates WHERE template_id=? AND key_version=? AND state=?",
                           [(tid, version, DELETED) for tid, version in erased])
            for cid, version, page_no in dropped_pages:
                self._forget_holder(db, PAGE, cid, version, page_no)
            db.executemany("DELETE FROM pages WHERE collection_id=? AND key_version=? AND page_no=?",
                           dropped_pages)

    def mark_deleted(self, collection_id: str, subject_hmac: bytes,
                     templates: list[TemplateRow]) -> None:
        """Tombstone the given templates (rows with their new MACs: no subject HMAC, no
        request HMAC left), forget the subject id."""
        with self.transaction() as db:
            for t in templates:
                self._forget_template(db, t.template_id, t.key_version)
            db.executemany("UPDATE templates SET subject_hmac=?, request_hmac=?, state=?, mac=? "
                           "WHERE template_id=? AND key_version=? AND state=?",
                           [(t.subject_hmac, t.request_hmac, t.state, t.mac, t.template_id,
                             t.key_version, LIVE) for t in templates])
            db.execute("DELETE FROM subjects WHERE collection_id=? AND subject_hmac=?",
                       (collection_id, subject_hmac))
            self._delete_attempts(db, collection_id, subject_hmac)

    # -- pages and blocks ----------------------------------------------------------------

    _PAGE_COLUMNS = "collection_id, key_version, page_no, generation, fill, ciphertext, mac"

    def pages(self, collection_id: str, key_version: int) -> list[PageRow]:
        """A key version's journal page rows."""
        return [PageRow(*r) for r in self._query(
            f"SELECT {self._PAGE_COLUMNS} FROM pages WHERE collection_id=? AND key_version=? "
            "ORDER BY page_no",
            (collection_id, key_version))]

    def page(self, collection_id: str, key_version: int, page_no: int) -> PageRow | None:
        """One journal page row, None if there is none."""
        rows = self._query(
            f"SELECT {self._PAGE_COLUMNS} FROM pages WHERE collection_id=? AND key_version=? "
            "AND page_no=?",
            (collection_id, key_version, page_no))
        return PageRow(*rows[0]) if rows else None

    _BLOCK_COLUMNS = ("collection_id, key_version, block_no, kind, generation, levels, fill, "
                      "digest, sketch, mac")

    def blocks(self, collection_id: str, key_version: int) -> list[BlockRow]:
        """A key version's block rows."""
        return [BlockRow(*r) for r in self._query(
            f"SELECT {self._BLOCK_COLUMNS} FROM blocks WHERE collection_id=? AND key_version=? "
            "ORDER BY block_no", (collection_id, key_version))]

    def block(self, collection_id: str, key_version: int, block_no: int) -> BlockRow | None:
        """One block row, None if there is none."""
        rows = self._query(
            f"SELECT {self._BLOCK_COLUMNS} FROM blocks WHERE collection_id=? AND key_version=? "
            "AND block_no=?", (collection_id, key_version, block_no))
        return BlockRow(*rows[0]) if rows else None

    def write_moved_block(self, block: BlockRow, templates: list[TemplateRow], job_id: str,
                          done: int, total: int) -> None:
        """One transaction: a block moved to a new key version, its templates' rows under
        that version (replacing those of an earlier move of the same block), the job's
        progress."""
        with self.transaction() as db:
            self._put_block(db, block)
            earlier = db.execute("SELECT template_id FROM templates WHERE collection_id=? AND "
                                 "key_version=? AND tier=? AND loc=?",
                                 (block.collection_id, block.key_version, BLOCK,
                                  block.block_no)).fetchall()
            for (tid,) in earlier:
                self._forget_template(db, tid, block.key_version)
            db.executemany("DELETE FROM templates WHERE template_id=? AND key_version=?",
                           [(tid, block.key_version) for (tid,) in earlier])
            self._insert_templates(db, templates)
            db.execute("UPDATE key_jobs SET blocks_done=?, blocks_total=? WHERE job_id=?",
                       (done, total, job_id))
