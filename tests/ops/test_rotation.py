"""Collection key rotation: a new transform and new CKKS keys, every template moved under
them without a template decrypted; matching goes on meanwhile; resumable; old gone."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from vault.domain.errors import DataLoss, FailedPrecondition
from vault.he import poly
from vault.he.params import budget
from vault.keys.hsm import HsmConfig
from vault.ops.imports import ImportItem
from vault.service import Tuning, Vault

DIM = 32
N = 4096
TUNING = Tuning(maintenance_interval=0, workers=0)


def _open(path: Path, hsm_config: HsmConfig) -> Vault:
    return Vault.open(path, hsm_config, tuning=TUNING)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


def _faces(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM))


def _populate(vault: Vault, imported: int) -> tuple[np.ndarray, np.ndarray]:
    """Single enrollments in the journal, and an import (clustered blocks + a mixed one)."""
    vault.create_collection("c", DIM, 0.8)
    single = _faces(20, 1)
    for i, f in enumerate(single):
        vault.enroll("c", f"s{i}", f.tolist(), request_id=f"e{i}")
    bulk = _faces(imported, 2)
    session = vault.start_import("c")
    session.add([ImportItem(f"b{i}", f.tolist(), f"r{i}") for i, f in enumerate(bulk)])
    session.finish()
    return single, bulk


def _wait(vault: Vault, job_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = vault.key_job(job_id)
        if job.state != "running":
            assert job.state == "done", job.error
            return
        time.sleep(0.1)
    raise TimeoutError("rotation did not finish")


def _scores(vault: Vault, probes: np.ndarray) -> list[tuple[str, float]]:
    out = []
    for p in probes:
        found = vault.identify("c", p.tolist(), top_k=1, threshold=-1.0,
                               release_scores=True).candidates
        out.append((found[0].subject_id, found[0].score))
    return out


def test_rotation_moves_every_template_under_new_keys(data: Path, hsm_config: HsmConfig) -> None:
    vault = _open(data, hsm_config)
    try:
        single, bulk = _populate(vault, N + 300)
        probes = np.concatenate([single[:5], bulk[[0, 1000, N + 5]]])
        before = _scores(vault, probes)
        old_files = sorted((data / "blocks" / "c" / "v1").glob("*.blk"))
        job = vault.rotate_collection_key("c")
        assert (job.from_version, job.to_version) == (1, 2)
        seen = []  # matching goes on while the job runs
        while vault.key_job(job.job_id).state == "running":
            now = _scores(vault, probes[:2])
            seen.append([s for s, _ in now] == [s for s, _ in before[:2]]
                        and all(abs(a - b) <= 0.02 + 2e-3 for (_, a), (_, b) in zip(now, before)))
        _wait(vault, job.job_id)
        assert seen and all(seen)  # matched at least once while the job ran, always right
        info = vault.get_collection("c")
        assert (info.key_version, info.template_count) == (2, 20 + N + 300)
        row = vault.store.collection("c")
        assert row.min_key_version == 2
        after = _scores(vault, probes)
        assert [s for s, _ in after] == [s for s, _ in before]
        # Released scores: 2 decimals, flooded by up to 0.005 each time.
        assert all(abs(a - b) <= 0.02 + 2e-3 for (_, a), (_, b) in zip(after, before))
        assert vault.verify("c", "s3", single[3].tolist()).matched
        assert vault.verify("c", "b7", bulk[7].tolist()).matched
        # The old version is gone: rows, keys, files (zero-filled, then removed).
        db = sqlite3.connect(vault.store.path)
        for table in ("templates", "blocks", "pages", "collection_keys"):
            assert db.execute(f"SELECT count(*) FROM {table} WHERE key_version=1").fetchone()[0] == 0
        vault.sweep_retired(0, everything=True)
        assert old_files and not any(p.exists() for p in old_files)
        # The stored values are the templates under the new transform, not the old one.
        gallery = vault.galleries()[0]
        ctx = vault.decider._context("c", 2)
        q = ctx.public.moduli[0]
        slot = db.execute("SELECT loc, slot FROM templates WHERE request_hmac=?",
                          (vault.integrity.request_index("c", "r7"),)).fetchone()
        values = [poly.centered(ctx.decrypt(np.ascontiguousarray(ct[:, :1]), False)[0], q)[slot[1]]
                  for ct in vault.read_block(gallery, gallery.blocks[slot[0]])]
        values = np.array(values) / gallery.params.template_scale
        new = vault.protect("c", 2, DIM, bulk[7])
        old = vault.protect("c", 1, DIM, bulk[7])
        # Noise: the import's encryption, the rotation's fresh one and its rescale.
        params = gallery.params
        assert np.abs(values - new).max() < 6 * budget(params, 2)["noise_sigma_units"] / params.template_scale
        assert np.abs(values - old).max() > 0.1
    finally:
        vault.close()
    # A restart loads version 2 and nothing else.
    vault = _open(data, hsm_config)
    try:
        assert vault.get_collection("c").key_version == 2
        assert vault.verify("c", "b7", bulk[7].tolist()).matched
        assert vault.enroll("c", "s3", single[3].tolist(), request_id="e3")[1] == 2  # retried
    finally:
        vault.close()


def test_rotation_resumes_after_a_stop_and_rotates_again(data: Path, hsm_config: HsmConfig) -> None:
    vault = _open(data, hsm_config)
    _single, bulk = _populate(vault, 3 * N)
    job = vault.rotate_collection_key("c")
    deadline = time.monotonic() + 120
    while vault.key_job(job.job_id).blocks_done < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vault.key_job(job.job_id).blocks_done >= 1  # the stop below lands mid-job
    vault.close()  # stops between blocks: a crash would leave the same state
    vault = _open(data, hsm_config)
    try:
        state = vault.key_job(job.job_id)
        assert state.state in ("running", "done")
        _wait(vault, job.job_id)
        assert vault.get_collection("c").key_version == 2
        # Deletions made under version 2 hold, and a second rotation goes to version 3.
        vault.delete_subject("c", "b11")
        second = vault.rotate_collection_key("c")
        _wait(vault, second.job_id)
        assert vault.get_collection("c").key_version == 3
        assert vault.get_collection("c").template_count == 20 + 3 * N - 1
        assert vault.verify("c", "b12", bulk[12].tolist()).matched
        top = vault.identify("c", bulk[11].tolist(), top_k=1, threshold=-1.0).candidates
        assert top and top[0].subject_id != "b11"
    finally:
        vault.close()


def test_one_rotation_at_a_time(data: Path, hsm_config: HsmConfig) -> None:
    vault = _open(data, hsm_config)
    try:
        _populate(vault, 10)
        gallery = vault.galleries()[0]
        with gallery.block_lock:  # holds the job at its first block
            job = vault.rotate_collection_key("c")
            with pytest.raises(FailedPrecondition, match="already running"):
                vault.rotate_collection_key("c")
        _wait(vault, job.job_id)
    finally:
        vault.close()


def test_min_key_version_stops_a_compromised_version_until_the_switch(
        data: Path, hsm_config: HsmConfig) -> None:
    vault = _open(data, hsm_config)
    try:
        single, _ = _populate(vault, 10)
        with pytest.raises(FailedPrecondition, match="between 1"):
            vault.set_min_key_version("c", 2)  # no version 2 yet
        gallery = vault.galleries()[0]
        with gallery.block_lock:  # the job cannot switch while this is held
            job = vault.rotate_collection_key("c")
            vault.set_min_key_version("c", 2)
            with pytest.raises(FailedPrecondition, match="below its minimum"):
                vault.verify("c", "s1", single[1].tolist())
            assert vault.get_collection_info("c").min_key_version == 2
        _wait(vault, job.job_id)
        assert vault.verify("c", "s1", single[1].tolist()).matched
        with pytest.raises(FailedPrecondition, match="only rises"):
            vault.set_min_key_version("c", 1)
    finally:
        vault.close()


def _audit_outcomes(data: Path) -> list[str]:
    db = sqlite3.connect(data / "audit.db")
    return [r[0] for r in db.execute("SELECT outcome FROM entries WHERE kind='integrity'")]


def test_replaying_the_old_version_after_a_rotation_is_detected(data: Path, hsm_config: HsmConfig) -> None:
    vault = _open(data, hsm_config)
    single, _ = _populate(vault, 10)
    vault.maintain(force=True)  # the journal into a block, so version 1 has block rows too
    backup = sqlite3.connect(":memory:")
    vault.store._db.backup(backup)  # the attacker's copy, taken before the rotation
    _wait(vault, vault.rotate_collection_key("c").job_id)
    vault.close()

    # 1. Old template and block rows (valid old MACs) written back: below the minimum key
    # version, they never load; the current version serves; the damage is audited.
    db = sqlite3.connect(data / "vault.db")
    with db:
        for table in ("templates", "blocks"):
            for row in backup.execute(f"SELECT * FROM {table} WHERE key_version=1"):
                db.execute(f"INSERT INTO {table} VALUES ({','.join('?' * len(row))})", row)
    db.close()
    vault = _open(data, hsm_config)
    try:
        assert vault.verify("c", "s1", single[1].tolist()).matched
    finally:
        vault.close()
    assert any(o.startswith("DATA_LOSS below_min_key_version") for o in _audit_outcomes(data))

    # 2. The old collection row itself (a rollback to before the rotation): newer rows give
    # it away; the collection refuses everything with DATA_LOSS.
    db = sqlite3.connect(data / "vault.db")
    with db:
        row = backup.execute("SELECT * FROM collections").fetchone()
        db.execute("DELETE FROM collections")
        db.execute(f"INSERT INTO collections VALUES ({','.join('?' * len(row))})", row)
    db.close()
    vault = _open(data, hsm_config)
    try:
        with pytest.raises(DataLoss, match="integrity"):
            vault.verify("c", "s1", single[1].tolist())
    finally:
        vault.close()
    assert any(o.startswith("DATA_LOSS collection_replayed") for o in _audit_outcomes(data))


def test_a_token_outage_pauses_a_rotation_which_then_finishes(
        data: Path, hsm_config: HsmConfig, monkeypatch) -> None:
    from vault.ops import rotation
    from vault.store import Store
    from vault.testing import BreakableHsm

    monkeypatch.setattr(rotation, "RETRY_SECONDS", 0.2)
    hsm = BreakableHsm(hsm_config)
    vault = Vault(Store(data / "vault.db"), hsm, data, tuning=TUNING)
    try:
        _single, bulk = _populate(vault, 2 * N)
        gallery = vault.galleries()[0]
        with gallery.block_lock:  # hold the job before its first block
            job = vault.rotate_collection_key("c")
            hsm.broken = True
        time.sleep(1.0)  # the job meets the outage, pauses, retries, pauses again
        assert vault.key_job(job.job_id).state == "running"
        assert vault.get_collection("c").key_version == 1
        hsm.broken = False
        _wait(vault, job.job_id)
        assert vault.get_collection("c").key_version == 2
        assert vault.verify("c", "b3", bulk[3].tolist()).matched
    finally:
        vault.close()


def test_a_paused_rotation_stays_one_job_in_one_thread(
        data: Path, hsm_config: HsmConfig, monkeypatch) -> None:
    """After a token outage the job retries in its own thread: it stays registered, a
    second RotateCollectionKey is refused, and close() waits for it (a relaunched thread
    used to be unregistered by its predecessor's clean-up, and a second thread ran the job)."""
    from vault.ops import rotation
    from vault.store import Store
    from vault.testing import BreakableHsm

    monkeypatch.setattr(rotation, "RETRY_SECONDS", 0.1)
    hsm = BreakableHsm(hsm_config)
    vault = Vault(Store(data / "vault.db"), hsm, data, tuning=TUNING)
    try:
        _populate(vault, 2 * N)
        gallery = vault.galleries()[0]
        with gallery.block_lock:
            job = vault.rotate_collection_key("c")
            hsm.broken = True
        time.sleep(1.0)  # several pauses and retries
        threads = list(vault.job_threads.values())
        assert len(threads) == 1 and threads[0].is_alive()
        with pytest.raises(FailedPrecondition, match="already running"):
            vault.rotate_collection_key("c")
        assert [t for t in vault.job_threads.values()] == threads
        hsm.broken = False
        _wait(vault, job.job_id)
        threads[0].join(timeout=30)
        assert not threads[0].is_alive() and not vault.job_threads
    finally:
        vault.close()


def test_a_failed_rotation_resumes_after_the_minimum_was_raised_to_its_target(
        data: Path, hsm_config: HsmConfig, monkeypatch) -> None:
    """The minimum raised to the rotation's target stops the collection until the switch;
    if the job then fails (here: one block move raises, as a lost decider would), the
    rotation that lifts the stop must still resume, or the collection is stuck for good."""
    from vault.ops import rotation

    real, failures = rotation.move_block, [RuntimeError("the decider went away")]

    def fails_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    vault = _open(data, hsm_config)
    try:
        single, bulk = _populate(vault, 2 * N)
        gallery = vault.galleries()[0]
        with gallery.block_lock:  # the job cannot move a block while this is held
            monkeypatch.setattr(rotation, "move_block", fails_once)
            job = vault.rotate_collection_key("c")
            vault.set_min_key_version("c", 2)
        deadline = time.monotonic() + 60
        while vault.key_job(job.job_id).state == "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert vault.key_job(job.job_id).state == "failed"
        with pytest.raises(FailedPrecondition, match="below its minimum"):
            vault.verify("c", "s1", single[1].tolist())
        assert vault.rotate_collection_key("c").job_id == job.job_id  # resumed, not refused
        _wait(vault, job.job_id)
        assert vault.verify("c", "b3", bulk[3].tolist()).matched
        assert vault.verify("c", "s1", single[1].tolist()).matched
    finally:
        vault.close()
