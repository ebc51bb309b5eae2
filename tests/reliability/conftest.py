"""Helpers shared by the fault tests: row counts of a live server's SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

TABLES = ("collections", "subjects", "templates", "blocks", "pages", "wrapped_keys")


def row_counts(db_path: Path) -> dict[str, int]:
    """Rows per table, read through a read-only connection (the server keeps writing)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        db.close()


@pytest.fixture(scope="session")
def faces(lfw) -> np.ndarray:
    """Real face embeddings, one per distinct person (float64)."""
    _, first = np.unique(lfw["ids"], return_index=True)
    return lfw["emb"][np.sort(first)].astype(np.float64)
