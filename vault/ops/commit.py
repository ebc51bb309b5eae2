"""One unit of work for the operations that write block generations (import, checkpoint,
compaction, rotation): write the new generations, commit one transaction that names them,
install them in memory, then retire the generations they replace.

What it writes before the transaction commits is removed if anything fails on the way (a
failed encryption, a full disk, a refused transaction): nothing is left for the start-up
sweep, and no later import meets a file of a block that was never committed. The replaced
generations are retired (after a grace period, :meth:`Core.retire`) only once the commit
held. A commit whose outcome is unknown (``CommitUnknown``) removes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

from vault import logs
from vault.core import Core
from vault.domain.errors import DataLoss, VaultError
from vault.domain.records import TemplateRow
from vault.gallery import CollectionGallery
from vault.gallery.blocks import Block
from vault.storage.errors import CommitUnknown

log = logs.get("vault.service")


class BlockCommit:
    """``with BlockCommit(core, gallery) as unit``: :meth:`write`, :meth:`replaces`, then
    :meth:`commit` the transaction (and install under the caller's lock)."""

    def __init__(self, core: Core, gallery: CollectionGallery) -> None:
        self._core, self._gallery = core, gallery
        self._written: list[Path] = []
        self._replaced: list[Path] = []
        self._committed = False

    def _path(self, block_no: int, generation: int) -> Path:
        g = self._gallery
        return self._core.files.path(g.collection_id, g.key_version, block_no, generation)

    def write(self, block_no: int, kind: int, generation: int, fill: int, cts: np.ndarray,
              moduli: Sequence[int], groups: np.ndarray | None = None,
              centroid: np.ndarray | None = None) -> Block:
        """Write one new block generation (:meth:`Core.write_block`), owned by this unit
        until the commit."""
        path = self._path(block_no, generation)
        self._written.append(path)  # before the write: a half-done one is removed too
        return self._core.write_block(self._gallery, block_no, kind, generation, fill, cts,
                                      moduli, groups, centroid)

    def replaces(self, block_no: int, generation: int) -> None:
        """A generation the commit replaces: retired once it held."""
        self._replaced.append(self._path(block_no, generation))

    def commit(self, transaction: Callable[[], None]) -> None:
        """Run the store transaction that names the new generations."""
        transaction()
        self._committed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._committed:
            for path in self._replaced:
                self._core.retire(path, erase=True)
        elif not isinstance(exc, CommitUnknown):
            for path in self._written:
                try:
                    self._core.files.remove(path, erase=True)
                except VaultError:  # the medium is out: the start-up sweep removes it
                    log.warning("a block generation no row names was left for the sweep")


def check_stored(core: Core, collection_id: str, rows: Sequence[TemplateRow]) -> None:
    """Before stored template rows are signed afresh (moved by a checkpoint, rotated
    to a new key version): DATA_LOSS, the collection damaged, unless every MAC holds,
    so that a row forged in the database is never laundered by a new MAC."""
    if not core.verified_all(rows):
        message = ("a stored template failed its integrity check: nothing was moved "
                   "or signed afresh")
        core.damage(collection_id, "template", message)
        raise DataLoss(message)
