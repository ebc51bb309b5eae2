"""Checkpoints (journal pages into blocks) and erasure of deleted templates.

The erasure claim is checked the hard way: the test takes the collection's secret key
from the decider, decrypts the stored block, and finds the deleted template's
coefficients empty in every dimension, and its neighbours intact.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vault.block_files import BlockFiles
from vault.domain.records import BLOCK, MIXED
from vault.he import poly
from vault.he.params import budget
from vault.keys.hsm import HsmConfig
from vault.service import Tuning, Vault

DIM = 64


@pytest.fixture
def vault(tmp_path: Path, hsm_config: HsmConfig):  # type: ignore[no-untyped-def]
    v = Vault.open(tmp_path / "data", hsm_config,
                   tuning=Tuning(maintenance_interval=0, workers=0, erase_after=3600))
    v.create_collection("c", DIM, 0.8)
    yield v
    v.close()


def _faces(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM))


def _block_plaintext(vault: Vault, block_no: int) -> np.ndarray:
    """Decrypted template values (D, N) of a stored block, read from its file."""
    gallery = vault.galleries()[0]
    ctx = vault.decider._context("c", gallery.key_version)
    block = gallery.blocks[block_no]
    cts = vault.read_block(gallery, block)
    q = ctx.public.moduli[0]
    return np.stack([poly.centered(ctx.decrypt(np.ascontiguousarray(ct[:, :1]), False)[0], q)
                     for ct in cts]) / gallery.params.template_scale


def _coefficient_bound(vault: Vault, reencryptions: int) -> float:
    """Six standard deviations of a stored coefficient's noise, in template units."""
    params = vault.galleries()[0].params
    return 6 * budget(params, reencryptions)["noise_sigma_units"] / params.template_scale


def test_checkpoint_moves_the_journal_into_a_block_and_matching_is_unchanged(vault: Vault) -> None:
    faces = _faces(40)
    for i, f in enumerate(faces):
        vault.enroll("c", f"s{i}", f.tolist())
    probe = faces[7] + 0.1 * _faces(1, 9)[0]
    before = vault.verify("c", "s7", probe.tolist(), release_scores=True)
    # Top 1 only: lower ranks of random faces are within the decision noise of each other.
    ident_before = vault.identify("c", probe.tolist(), top_k=1, threshold=-1.0)
    vault.maintain(force=True)
    gallery = vault.galleries()[0]
    assert not gallery.pages and [b.kind for b in gallery.blocks.values()] == [MIXED]
    db = sqlite3.connect(vault.store.path)
    assert db.execute("SELECT count(*) FROM pages").fetchone()[0] == 0
    assert db.execute("SELECT DISTINCT tier FROM templates").fetchall() == [(BLOCK,)]
    after = vault.verify("c", "s7", probe.tolist(), release_scores=True)
    ident_after = vault.identify("c", probe.tolist(), top_k=1, threshold=-1.0)
    assert before.matched and after.matched
    # Each released score is within 0.005 (rounding) + 0.005 (flooding) of the cosine.
    assert abs(before.candidates[0].score - after.candidates[0].score) <= 0.02 + 2e-3
    assert [c.subject_id for c in ident_before.candidates] == ["s7"]
    assert [c.subject_id for c in ident_after.candidates] == ["s7"]
    # The block holds exactly the protected templates, at their slots.
    values = _block_plaintext(vault, 0)
    protected = np.stack([vault.protect("c", 1, DIM, f) for f in faces])
    rows = {r[0]: r[1] for r in db.execute("SELECT subject_hmac, slot FROM templates")}
    for i in (0, 7, 39):
        slot = rows[vault.integrity.subject_index("c", f"s{i}")]
        # Noise: the page's rescale and the fresh encryption (vault/he/params.py).
        assert np.abs(values[:, slot] - protected[i]).max() < _coefficient_bound(vault, 1)
    # More enrollments go to new pages, and the next checkpoint fills the same block.
    vault.enroll("c", "late", _faces(1, 5)[0].tolist())
    vault.maintain(force=True)
    assert len(gallery.blocks) == 1 and gallery.blocks[0].fill == 41 and gallery.blocks[0].generation == 2
    assert vault.verify("c", "late", _faces(1, 5)[0].tolist()).matched


def test_deleted_template_values_leave_the_block(vault: Vault) -> None:
    faces = _faces(10, 1)
    for i, f in enumerate(faces):
        vault.enroll("c", f"s{i}", f.tolist())
    vault.maintain(force=True)
    gallery = vault.galleries()[0]
    db = sqlite3.connect(vault.store.path)
    slot = db.execute("SELECT slot FROM templates WHERE subject_hmac=?",
                      (vault.integrity.subject_index("c", "s4"),)).fetchone()[0]
    old_file = vault.files.path("c", 1, 0, gallery.blocks[0].generation)
    values = _block_plaintext(vault, 0)
    assert np.abs(values[:, slot]).max() > 0.05  # the template is there
    vault.delete_subject("c", "s4")
    assert not vault.identify("c", faces[4].tolist(), threshold=-1.0).candidates or \
        vault.identify("c", faces[4].tolist(), threshold=-1.0).candidates[0].subject_id != "s4"
    vault.maintain()  # erase_after is an hour: nothing is due yet
    assert gallery.blocks[0].generation == 2 - 1
    vault.maintain(force=True)
    assert gallery.blocks[0].generation == 2
    erased = _block_plaintext(vault, 0)
    assert np.abs(erased[:, slot]).max() < _coefficient_bound(vault, 2)  # noise only; values ~0.1
    others = [s for s in range(10) if s != slot]
    assert np.abs(erased[:, others] - values[:, others]).max() < _coefficient_bound(vault, 2)
    # Its values erased, the tombstone goes too: no row is left at that slot.
    assert db.execute("SELECT count(*) FROM templates WHERE slot=?", (slot,)).fetchone() == (0,)
    assert not old_file.exists()  # the old generation, zero-filled, then removed
    for i in range(10):
        if i != 4:
            assert vault.verify("c", f"s{i}", faces[i].tolist()).matched


def test_deleted_journal_templates_leave_with_their_page(vault: Vault) -> None:
    faces = _faces(3, 2)
    for i, f in enumerate(faces):
        vault.enroll("c", f"s{i}", f.tolist())
    page = sqlite3.connect(vault.store.path).execute("SELECT ciphertext FROM pages").fetchone()[0]
    vault.delete_subject("c", "s1")
    vault.maintain(force=True)
    db = sqlite3.connect(vault.store.path)
    assert db.execute("SELECT count(*) FROM pages").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM templates WHERE state=2").fetchall() == [(0,)]
    # secure_delete and the pass's WAL truncation: the page's bytes are not left behind in
    # the database file or its WAL (no checkpoint by the test: the vault's own).
    raw = b"".join(p.read_bytes() for p in vault.store.path.parent.glob("vault.db*"))
    assert page[1000:1064] not in raw
    assert vault.galleries()[0].blocks[0].fill == 2


def test_restart_finds_everything_and_sweeps_unnamed_block_files(vault: Vault, hsm_config: HsmConfig) -> None:
    faces = _faces(5, 3)
    for i, f in enumerate(faces):
        vault.enroll("c", f"s{i}", f.tolist())
    vault.maintain(force=True)
    data = vault.store.path.parent
    stray = vault.files.path("c", 1, 7, 1)  # as if a crash hit between file and row
    vault.files.write(stray, [np.zeros((DIM, 2, 8), np.uint64)], [3])
    vault.close()
    v = Vault.open(data, hsm_config, tuning=Tuning(maintenance_interval=0, workers=0))
    try:
        assert not stray.exists()
        assert v.get_collection("c").template_count == 5
        assert all(v.verify("c", f"s{i}", f.tolist()).matched for i, f in enumerate(faces))
        assert BlockFiles.read(v.files.path("c", 1, 0, 1))[1] == v.galleries()[0].blocks[0].digest
    finally:
        v.close()


def test_a_journal_left_below_its_threshold_moves_once_enrollments_stop(vault: Vault) -> None:
    """Pages left below journal_pages slow every 1:N (each is scored and decrypted apart):
    the maintenance thread checkpoints a journal that did not change for one pass."""
    import dataclasses
    import time

    from vault.ops import maintenance

    vault.tuning = dataclasses.replace(vault.tuning, journal_quiet=0.05)
    journals: dict = {}
    faces = _faces(3)
    vault.enroll("c", "s0", faces[0].tolist())
    gallery = vault.galleries()[0]
    maintenance.run_once(vault, journals=journals)  # first sight: one page, below 16
    assert len(gallery.pages) == 1 and not gallery.blocks
    vault.enroll("c", "s1", faces[1].tolist())
    time.sleep(0.1)
    maintenance.run_once(vault, journals=journals)  # it changed since: still enrolling
    assert len(gallery.pages) == 1 and not gallery.blocks
    time.sleep(0.1)
    maintenance.run_once(vault, journals=journals)  # unchanged for journal_quiet: moved
    assert not gallery.pages and [b.fill for b in gallery.blocks.values()] == [2]
    vault.maintain()  # a pass without the thread's memory keeps the journal-size rule only
    vault.enroll("c", "s2", faces[2].tolist())
    vault.maintain()
    assert len(gallery.pages) == 1
    hits = vault.identify("c", faces[1].tolist(), top_k=1, threshold=-1.0)
    assert [c.subject_id for c in hits.candidates] == ["s1"]
