"""Failed 1:1 attempts lock a subject for a cool-down (as Face ID locks after 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vault.errors import ResourceExhausted
from vault.keys.hsm import HsmConfig
from vault.service import AttemptLimits, Vault


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_lockout_after_failures_survives_restart_and_expires(tmp_path: Path, hsm_config: HsmConfig,
                                                               lfw) -> None:
    emb = lfw["emb"].astype(np.float64)
    ids = lfw["ids"]
    alice, bob, carol = (int(np.flatnonzero(ids == p)[0]) for p in np.unique(ids)[:3])
    clock = Clock()
    limits = AttemptLimits(max_failures=3, lockout_seconds=60)
    vault = Vault.open(tmp_path / "data", hsm_config, limits=limits, clock=clock)
    try:
        vault.create_collection("c", 128, 0.9)
        vault.enroll("c", "alice", emb[alice])
        vault.enroll("c", "carol", emb[carol])
        # Two failures, then a success: the count starts again.
        for _ in range(2):
            assert not vault.verify("c", "alice", emb[bob]).matched
        assert vault.verify("c", "alice", emb[alice]).matched
        for _ in range(2):
            assert not vault.verify("c", "alice", emb[bob]).matched
        # The third failure in a row locks alice: even her own face is refused now.
        assert not vault.verify("c", "alice", emb[bob]).matched
        with pytest.raises(ResourceExhausted, match="locked, retry in 60 s"):
            vault.verify("c", "alice", emb[alice])
        assert vault.verify("c", "carol", emb[carol]).matched  # other subjects are unaffected
    finally:
        vault.close()

    # A restart does not reset the lock (an attacker could otherwise crash it away).
    vault = Vault.open(tmp_path / "data", hsm_config, limits=limits, clock=clock)
    try:
        clock.now += 30
        with pytest.raises(ResourceExhausted, match="retry in 30 s"):
            vault.verify("c", "alice", emb[alice])
        clock.now += 31
        assert vault.verify("c", "alice", emb[alice]).matched
        # The lock message never names the subject.
        try:
            for _ in range(4):
                vault.verify("c", "alice", emb[bob])
        except ResourceExhausted as exc:
            assert "alice" not in str(exc) and "alice" not in repr(exc)
        else:
            raise AssertionError("alice was not locked again")
        # Deleting the subject forgets its attempts too.
        vault.delete_subject("c", "alice")
        assert vault.store._query("SELECT COUNT(*) FROM verify_attempts")[0][0] == 0
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
