"""DeleteCollection in process: refused while its key rotation runs, and enrollments racing
it leave no row or file of the collection behind."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vault.domain.errors import FailedPrecondition, NotFound, VaultError
from vault.keys.hsm import HsmConfig
from vault.ops.imports import ImportItem
from vault.service import Tuning, Vault
from vault.storage.keys import KeyRecords

DIM = 16
TUNING = Tuning(maintenance_interval=0, workers=0)


def _faces(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM))


def _rows(path: Path, cid: str) -> dict[str, int]:
    db = sqlite3.connect(path / "vault.db")
    counts = {t: db.execute(f"SELECT COUNT(*) FROM {t} WHERE collection_id=?", (cid,)).fetchone()[0]
              for t in KeyRecords._COLLECTION_TABLES}
    db.close()
    return {t: n for t, n in counts.items() if n}


def test_a_running_rotation_refuses_the_deletion_which_then_succeeds(
        tmp_path: Path, hsm_config: HsmConfig) -> None:
    data = tmp_path / "data"
    vault = Vault.open(data, hsm_config, tuning=TUNING)
    try:
        vault.create_collection("c", DIM, 0.8)
        session = vault.start_import("c")
        session.add([ImportItem(f"b{i}", f.tolist(), f"r{i}") for i, f in enumerate(_faces(300, 1))])
        session.finish()
        gallery = vault.galleries()[0]
        with gallery.block_lock:  # holds the job at its first block
            job = vault.rotate_collection_key("c")
            with pytest.raises(FailedPrecondition, match="rotation"):
                vault.delete_collection("c")
            assert vault.get_collection("c").template_count == 300
        deadline = time.monotonic() + 300
        while vault.key_job(job.job_id).state == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert vault.delete_collection("c") == 300
        with pytest.raises(NotFound):
            vault.get_collection("c")
    finally:
        vault.close()
    assert _rows(data, "c") == {} and not (data / "blocks" / "c").exists()


def test_enrollments_racing_the_deletion_leave_nothing_behind(
        tmp_path: Path, hsm_config: HsmConfig) -> None:
    data = tmp_path / "data"
    vault = Vault.open(data, hsm_config, tuning=TUNING)
    outcomes: list[str] = []
    try:
        vault.create_collection("c", DIM, 0.8)
        vault.create_collection("k", DIM, 0.8)
        faces = _faces(200, 2)

        def enroll(start: int) -> None:
            for i in range(start, len(faces), 4):
                try:
                    vault.enroll("c", f"s{i}", faces[i].tolist(), request_id=f"q{i}")
                    outcomes.append("OK")
                except VaultError as exc:  # the message says which
                    outcomes.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=enroll, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        while outcomes.count("OK") < 8:
            time.sleep(0.01)
        vault.delete_collection("c")
        for t in threads:
            t.join(timeout=120)
        vault.enroll("k", "x", faces[0].tolist())
    finally:
        vault.close()
    assert "OK" in outcomes and "NotFound: collection not found" in outcomes  # a real race
    assert set(outcomes) <= {"OK", "NotFound: collection not found"}
    assert _rows(data, "c") == {} and not (data / "blocks" / "c").exists()
    reopened = Vault.open(data, hsm_config, tuning=TUNING)  # the store still loads whole
    try:
        assert reopened.get_collection("k").template_count == 1
        with pytest.raises(NotFound):
            reopened.get_collection("c")
    finally:
        reopened.close()


def test_a_negative_zero_threshold_is_stored_as_signed(tmp_path: Path, hsm_config: HsmConfig) -> None:
    """SQLite stores -0.0 as 0.0: a row signed over -0.0 then failed its MAC (DATA_LOSS on
    every GetCollection; found by tests/api/test_fuzz.py)."""
    data = tmp_path / "data"
    vault = Vault.open(data, hsm_config, tuning=TUNING)
    try:
        vault.create_collection("z", DIM, -0.0)
        assert vault.get_collection("z").threshold == 0.0
        vault.update_collection("z", threshold=0.5)
        vault.update_collection("z", threshold=-0.0)
        assert vault.get_collection("z").threshold == 0.0
    finally:
        vault.close()
