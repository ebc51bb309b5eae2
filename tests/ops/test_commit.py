"""The unit of work of block writers (vault.ops.commit): a transaction refused after the
block files were written leaves none of them behind, and the retry stores everything."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vault.domain.errors import Unavailable
from vault.keys.hsm import HsmConfig
from vault.ops.imports import ImportItem
from vault.service import Tuning, Vault

DIM = 32


def test_a_refused_import_transaction_leaves_no_block_file(tmp_path: Path,
                                                           hsm_config: HsmConfig) -> None:
    data = tmp_path / "data"
    vault = Vault.open(data, hsm_config, tuning=Tuning(maintenance_interval=0, workers=0))
    try:
        vault.create_collection("c", DIM, 0.8)
        rng = np.random.default_rng(5)
        items = [ImportItem(f"p{i}", v.tolist(), f"r{i}")
                 for i, v in enumerate(rng.standard_normal((4200, DIM)))]
        # Another process (a backup tool, an operator's sqlite3 shell) holds the write lock
        # while the import encrypts: its block files are written, its transaction refused.
        holder = sqlite3.connect(data / "vault.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        session = vault.start_import("c")
        with pytest.raises(Unavailable, match="database is locked"):
            session.add(items)
            session.finish()
        holder.execute("ROLLBACK")
        holder.close()
        assert not list((data / "blocks").rglob("*.blk"))  # not left for the next start
        assert vault.get_collection("c").template_count == 0
        retry = vault.start_import("c")
        results = retry.add(items) + retry.finish()
        assert all(r.error is None for r in results) and len(results) == len(items)
        assert len(list((data / "blocks").rglob("*.blk"))) == len(vault.galleries()[0].blocks)
    finally:
        vault.close()
