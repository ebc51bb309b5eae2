"""1:N release: the token is asked a constant number of times, whatever top_k is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from vault.ops.imports import ImportItem
from vault.service import Vault


def _counting(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every HMAC call the vault makes on the token client (``hmac`` goes through
    ``hmac_many``, so a single HMAC counts twice: the count only errs upwards)."""
    calls: list[str] = []

    def wrap(name: str) -> None:
        real: Callable[..., Any] = getattr(vault.hsm, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(vault.hsm, name, counted)

    for name in ("hmac", "hmac_many"):
        wrap(name)
    return calls


def test_a_1_to_n_release_asks_the_token_once_whatever_top_k(
        vault: Vault, lfw: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    emb = lfw["emb"].astype(np.float64)
    vault.create_collection("c", 128, -1.0)  # every template is a candidate
    session = vault.start_import("c")
    session.add([ImportItem(f"s{i}", e.tolist()) for i, e in enumerate(emb[:300])])
    session.finish()
    for i in range(3):  # journal pages too
        vault.enroll("c", f"e{i}", emb[400 + i].tolist())
    # Once per row state, the decider checks the collection row's MAC itself (its own
    # session under `vault serve`): a first match pays it before counting.
    vault.identify("c", emb[501].tolist())
    calls = _counting(vault, monkeypatch)
    asked = {}
    for top_k in (1, 5, 10):  # 10: the cap (vault.validation.MAX_TOP_K)
        calls.clear()
        result = vault.identify("c", emb[500].tolist(), top_k=top_k)
        assert len(result.candidates) == top_k
        asked[top_k] = len(calls)
    assert asked == {1: 1, 5: 1, 10: 1}, asked


def test_one_forged_row_among_the_candidates_is_data_loss(
        vault: Vault, lfw: dict[str, np.ndarray]) -> None:
    """The batch check fails as a whole when a candidate's row was rewritten by a writer
    of the database (here the MACs of ranks 2-9: ranks near 10 may swap with the 11th
    within the decision noise, these stay among the ten)."""
    import sqlite3

    from vault.domain.errors import DataLoss

    emb = lfw["emb"].astype(np.float64)
    vault.create_collection("c", 128, -1.0)
    session = vault.start_import("c")
    session.add([ImportItem(f"s{i}", e.tolist()) for i, e in enumerate(emb[:300])])
    session.finish()
    named = vault.identify("c", emb[500].tolist(), top_k=10).candidates
    assert len(named) == 10
    with sqlite3.connect(vault.store.path) as db:
        db.executemany("UPDATE templates SET mac=zeroblob(32) WHERE subject_hmac=?",
                       [(c.subject_hmac,) for c in named[1:9]])
    with pytest.raises(DataLoss, match="failed its integrity check"):
        vault.identify("c", emb[500].tolist(), top_k=10)
    # The subject whose rows were left alone is still answered for (1:1).
    vault.verify("c", named[0].subject_id, emb[500].tolist())
