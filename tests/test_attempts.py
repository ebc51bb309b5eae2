"""Failed 1:1 attempts lock a (subject, credential) pair for a cool-down (vault.attempts)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vault.attempts import AttemptLimits
from vault.domain.errors import DataLoss, ResourceExhausted
from vault.keys.hsm import HsmConfig
from vault.service import Vault


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _faces(lfw) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    emb, ids = lfw["emb"].astype(np.float64), lfw["ids"]
    alice, bob, carol = (int(np.flatnonzero(ids == p)[0]) for p in np.unique(ids)[:3])
    return emb[alice], emb[bob], emb[carol], emb


def test_lockout_survives_restart_expires_and_successes_do_not_reset_it(
        tmp_path: Path, hsm_config: HsmConfig, lfw) -> None:
    alice, bob, carol, _ = _faces(lfw)
    clock = Clock()
    limits = AttemptLimits(max_failures=3, lockout_seconds=60)
    vault = Vault.open(tmp_path / "data", hsm_config, limits=limits, clock=clock)
    try:
        vault.create_collection("c", 128, 0.9)
        vault.enroll("c", "alice", alice)
        vault.enroll("c", "carol", carol)
        # Failures and successes interleaved: a success does not wipe the failures.
        for _ in range(2):
            assert not vault.verify("c", "alice", bob).matched
            assert vault.verify("c", "alice", alice).matched
        assert not vault.verify("c", "alice", bob).matched  # the third failure locks
        with pytest.raises(ResourceExhausted, match="locked, retry in 60 s"):
            vault.verify("c", "alice", alice)
        assert vault.verify("c", "carol", carol).matched  # other subjects are unaffected
    finally:
        vault.close()

    # A restart does not reset the lock (an attacker could otherwise crash it away).
    vault = Vault.open(tmp_path / "data", hsm_config, limits=limits, clock=clock)
    try:
        clock.now += 30
        with pytest.raises(ResourceExhausted, match="retry in 30 s"):
            vault.verify("c", "alice", alice)
        clock.now += 31
        assert vault.verify("c", "alice", alice).matched
        # Failures spread beyond the window are forgotten (a genuine user's rare misses).
        for _ in range(2):
            assert not vault.verify("c", "alice", bob).matched
            clock.now += 61
        assert vault.verify("c", "alice", alice).matched
        # The lock message never names the subject.
        with pytest.raises(ResourceExhausted) as err:
            for _ in range(4):
                vault.verify("c", "alice", bob)
        assert "alice" not in str(err.value) and "alice" not in repr(err.value)
        # Deleting the subject forgets its attempts too.
        vault.delete_subject("c", "alice")
        assert vault.store._query("SELECT COUNT(*) FROM verify_attempts "
                                  "WHERE subject_hmac=?",
                                  (vault.integrity.subject_index("c", "alice"),))[0][0] == 0
    finally:
        vault.close()


def test_limit_zero_disables_the_lock(tmp_path: Path, hsm_config: HsmConfig, lfw) -> None:
    emb = lfw["emb"].astype(np.float64)
    vault = Vault.open(tmp_path / "data", hsm_config, limits=AttemptLimits(max_failures=0))
    try:
        vault.create_collection("c", 128, 0.9)
        vault.enroll("c", "a", emb[0])
        far = -emb[0]
        for _ in range(8):
            assert not vault.verify("c", "a", far).matched
        assert vault.verify("c", "a", emb[0]).matched
    finally:
        vault.close()


def test_per_credential_with_an_alert_and_an_audited_integrity_failure(
        tmp_path: Path, hsm_config: HsmConfig, lfw) -> None:
    alice, bob, _, _ = _faces(lfw)
    clock = Clock()
    limits = AttemptLimits(max_failures=2, lockout_seconds=60, alert_credentials=2)
    data = tmp_path / "data"
    vault = Vault.open(data, hsm_config, limits=limits, clock=clock)
    try:
        vault.create_collection("c", 128, 0.9)
        vault.enroll("c", "alice", alice)
        for _ in range(2):
            assert not vault.verify("c", "alice", bob, credential="gate-1").matched
        with pytest.raises(ResourceExhausted):
            vault.verify("c", "alice", alice, credential="gate-1")
        # Another credential is not locked out by the first one.
        assert vault.verify("c", "alice", alice, credential="gate-2").matched
        for _ in range(2):
            assert not vault.verify("c", "alice", bob, credential="gate-2").matched
        # Two credentials locked on one subject: an alert on the audit record.
        audit = sqlite3.connect(data / "audit.db")
        kinds = [k for (k,) in audit.execute("SELECT kind FROM entries")]
        assert kinds.count("alert") == 1
        # The credentials are stored as HMACs only.
        raw = (data / "vault.db").read_bytes() + (data / "vault.db-wal").read_bytes()
        assert b"gate-1" not in raw and b"gate-2" not in raw
        # Someone with write access clears gate-1's lock: detected, and it stays locked.
        db = sqlite3.connect(data / "vault.db")
        with db:
            assert db.execute("UPDATE verify_attempts SET locked_until=0, failures=0").rowcount == 2
        db.close()
        with pytest.raises(DataLoss, match="integrity check"):
            vault.verify("c", "alice", alice, credential="gate-1")
        with pytest.raises(DataLoss):
            vault.verify("c", "alice", alice, credential="gate-3")  # the subject, for everyone
        outcomes = [o for (o,) in audit.execute("SELECT outcome FROM entries WHERE kind='integrity'")]
        assert "DATA_LOSS verify_attempts" in outcomes
        audit.close()
        # An administrator unlocks it.
        assert vault.unlock_subject("c", "alice") == 2
        assert vault.verify("c", "alice", alice, credential="gate-1").matched
    finally:
        vault.close()


def test_expired_rows_are_pruned_but_a_forged_one_stays(tmp_path: Path, hsm_config: HsmConfig,
                                                        lfw) -> None:
    alice, bob, _, _ = _faces(lfw)
    clock = Clock()
    vault = Vault.open(tmp_path / "data", hsm_config, clock=clock,
                       limits=AttemptLimits(max_failures=3, lockout_seconds=60))
    try:
        vault.create_collection("c", 128, 0.9)
        vault.enroll("c", "alice", alice)
        for subject in ("alice", "nobody", "no-one"):  # unknown subjects leave rows too
            assert not vault.verify("c", subject, bob, credential="gate",
                                    reveal_unknown=False).matched
        count = "SELECT COUNT(*) FROM verify_attempts"
        assert vault.store._query(count)[0][0] == 3
        vault.maintain()
        assert vault.store._query(count)[0][0] == 3  # still in their window
        clock.now += 61
        db = sqlite3.connect(tmp_path / "data" / "vault.db")
        with db:  # a forged row: edited, so its MAC no longer holds
            db.execute("UPDATE verify_attempts SET failures=2 WHERE subject_hmac=?",
                       (vault.integrity.subject_index("c", "alice"),))
        db.close()
        vault.maintain()
        assert vault.store._query(count)[0][0] == 1
        with pytest.raises(DataLoss):
            vault.verify("c", "alice", alice, credential="gate")
    finally:
        vault.close()
