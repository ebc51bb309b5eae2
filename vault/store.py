"""Store role, part 1: the database with metadata, journal pages, wrapped keys.

Two engines run the same SQL (:mod:`vault.storage.connection`): a SQLite file in the data
directory (the embedded default, described here) or a PostgreSQL database given by URL
(:mod:`vault.storage.postgres`: the same tables and guarantees, and the block ciphertexts
too, so replicas share it).

WAL journal with ``synchronous=FULL`` (an acknowledged write survives power loss) and
``secure_delete`` (freed pages are zeroed, so overwritten ciphertexts and deleted rows do
not linger in the file). Every multi-row change is one transaction: a crash leaves either
the old or the new state, never half of an enrollment. Block ciphertexts live in files
(:mod:`vault.block_files`), named by the block rows here.

What is stored, and in what form:

- subject ids: AES-GCM under a data key wrapped by the HSM, found by an HMAC blind index;
- request ids: only their HMAC;
- templates: no values at all, only where their encrypted values sit (tier, page or
  block, slot) and whether they were erased from the ciphertexts;
- journal pages: CKKS ciphertexts under the collection's public key;
- block sketches (pre-filter centroids): AES-GCM under a data key wrapped by the HSM;
- CKKS secret contexts and data keys: wrapped by the HSM key-encryption key;
- a MAC keyed in the HSM on every collection, template, page and block row;
- per (collection, key version), a commitment to the live set (``collection_state``:
  a counter and an order-independent digest of the live template, page and block rows,
  MACed in the HSM), updated inside every transaction that changes those rows, so that a
  row deleted, restored or replayed behind the vault's back is found at load;
- no timestamps: nothing the engine does needs to know when a row was written.

A deleted template's row (tombstone) keeps only its place, and goes once its values are
erased from the ciphertexts; the subject's sealed id goes at once.
"""

from __future__ import annotations

from pathlib import Path

from vault.block_files import BlockBlobs, BlockFiles, BlockStore
from vault.storage.keys import KeyRecords
from vault.storage.sqlite import SCHEMA_VERSION
from vault.storage.templates import TemplateRecords

__all__ = ["SCHEMA_VERSION", "Store"]


class Store(TemplateRecords, KeyRecords):
    """The vault's repository: one connection (vault.storage.connection: SQLite or
    PostgreSQL), the live-set ledger every write goes through (vault.storage.live_set),
    and the rows by concern."""

    def block_store(self, root: Path) -> BlockStore:
        """Where block generations live: files under ``root`` (SQLite), or rows of the
        database itself (PostgreSQL: any node rebuilds its state from it)."""
        if self.engine.kind == "postgresql":
            return BlockBlobs(self)
        return BlockFiles(root)
