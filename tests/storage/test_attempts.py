"""The attempt set's commitment, checked per subject in constant time (vault/storage/attempts),
and still finding a row deleted behind the vault's back, live or between two runs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vault.attempts import AttemptLimits
from vault.domain.errors import DataLoss
from vault.keys.hsm import HsmConfig
from vault.service import Vault
from vault.storage.live_set import ATTEMPT_SET

OTHERS = 40


def _delete_row(data: Path, vault: Vault, subject: str) -> None:
    """A writer with access to the database deletes one subject's attempt row."""
    db = sqlite3.connect(data / "vault.db", timeout=30)
    with db:
        assert db.execute("DELETE FROM verify_attempts WHERE subject_hmac=?",
                          (vault.integrity.subject_index("c", subject),)).rowcount == 1
    db.close()


def test_reservations_check_their_subject_only_and_a_deleted_row_is_still_found(
        tmp_path: Path, hsm_config: HsmConfig, lfw) -> None:
    emb, ids = lfw["emb"].astype(np.float64), lfw["ids"]
    alice, bob = (emb[int(np.flatnonzero(ids == p)[0])] for p in np.unique(ids)[:2])
    data = tmp_path / "data"
    limits = AttemptLimits(max_failures=3, lockout_seconds=600)
    vault = Vault.open(data, hsm_config, limits=limits)
    try:
        vault.create_collection("c", 128, 0.9)
        vault.enroll("c", "alice", alice)
        for k in range(OTHERS):  # rows of other subjects (tries on unknown ones)
            assert not vault.verify("c", f"nobody-{k}", bob, reveal_unknown=False).matched
        # Every check of the attempt set's MAC: a full check of the collection's rows.
        live_set = vault.store.live_set
        assert live_set is not None
        full_checks: list[int] = []
        check = live_set.check

        def counted(mac: bytes, cid: str, version: int, counter: int, digest: bytes) -> bool:
            full_checks.append(version)
            return check(mac, cid, version, counter, digest)

        live_set.check = counted  # type: ignore[method-assign]
        for _ in range(5):
            assert vault.verify("c", "alice", alice).matched  # a success writes nothing
        # No reservation re-read the collection: the store knew the state it last saw.
        assert ATTEMPT_SET not in full_checks
        assert not vault.verify("c", "alice", bob).matched  # a failure writes one row...
        assert vault.verify("c", "alice", alice).matched
        # ...whose commit checks the state row it builds on (one MAC, no scan), and the
        # store knows the state it wrote: the next reservation checks nothing more.
        assert full_checks.count(ATTEMPT_SET) == 1

        # A writer deletes a locked-in-progress row under the running vault: found at once,
        # and from then on for every subject, until an administrator unlocks.
        _delete_row(data, vault, "nobody-7")
        with pytest.raises(DataLoss, match="attempt records of this collection"):
            vault.verify("c", "nobody-7", bob, reveal_unknown=False)
        with pytest.raises(DataLoss, match="attempt records of this collection"):
            vault.verify("c", "alice", alice)
        vault.unlock_subject("c", "nobody-7")
        assert vault.verify("c", "alice", alice).matched
    finally:
        vault.close()

    # After a restart, the first reservation checks the whole collection: a row deleted
    # before it (here, between the start and the first 1:1) is found too.
    vault = Vault.open(data, hsm_config, limits=limits)
    try:
        assert vault.verify("c", "alice", alice).matched
    finally:
        vault.close()
    vault = Vault.open(data, hsm_config, limits=limits)
    try:
        _delete_row(data, vault, "nobody-3")
        with pytest.raises(DataLoss, match="attempt records of this collection"):
            vault.verify("c", "alice", alice)
    finally:
        vault.close()
