"""Bulk import: clustered blocks, leftovers in the journal, per-item results, retries."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vault.domain.errors import AlreadyExists, InvalidArgument
from vault.domain.records import CLUSTERED, MIXED
from vault.keys.hsm import HsmConfig
from vault.ops.imports import ImportItem
from vault.service import Tuning, Vault

DIM = 32
N = 4096


@pytest.fixture
def vault(tmp_path: Path, hsm_config: HsmConfig):  # type: ignore[no-untyped-def]
    v = Vault.open(tmp_path / "data", hsm_config, tuning=Tuning(maintenance_interval=0, workers=0))
    v.create_collection("c", DIM, 0.8)
    yield v
    v.close()


def _people(n_ids: int, per: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, DIM))
    x = np.repeat(centres, per, axis=0) + 0.5 * rng.standard_normal((n_ids * per, DIM))
    return x, np.repeat(np.arange(n_ids), per)


def _run(vault: Vault, items: list[ImportItem], batch: int = 700) -> dict:
    session = vault.start_import("c")
    results = []
    for start in range(0, len(items), batch):
        results += session.add(items[start:start + batch])
    results += session.finish()
    assert sorted(r.index for r in results) == list(range(len(items)))
    return {r.index: r for r in results}


def test_import_fills_clustered_blocks_and_the_journal(vault: Vault) -> None:
    x, owner = _people(1700, 5)  # 8,500: two full blocks and 308 left over
    items = [ImportItem(f"p{o}", v.tolist(), f"r{i}") for i, (v, o) in enumerate(zip(x, owner))]
    results = _run(vault, items)
    assert all(r.error is None and r.key_version == 1 for r in results.values())
    assert len({r.template_id for r in results.values()}) == len(items)
    gallery = vault.galleries()[0]
    # Two full clustered blocks with sketches; the rest in a mixed block, none in the journal.
    assert [(b.kind, b.fill) for b in gallery.blocks.values()] == \
        [(CLUSTERED, N), (CLUSTERED, N), (MIXED, len(items) - 2 * N)]
    assert [b.centroid is not None for b in gallery.blocks.values()] == [True, True, False]
    assert not gallery.pages
    assert vault.get_collection("c").template_count == len(items)
    # Blocks hold templates near each other: each member is nearer its own block's sketch.
    protected = vault.decider.transform("c", 1, DIM, x / np.linalg.norm(x, axis=1, keepdims=True))
    clustered = [b for b in gallery.blocks.values() if b.kind == CLUSTERED]
    sketches = np.stack([b.centroid for b in clustered])
    place = {vault.integrity.request_index("c", f"r{i}"): i for i in range(0, len(items), 7)}
    rows = sqlite3.connect(vault.store.path).execute(
        "SELECT request_hmac, tier, loc FROM templates").fetchall()
    for b, block in enumerate(clustered):
        members = [place[r] for r, tier, loc in rows if r in place and tier == 1 and loc == block.block_no]
        nearest = np.argmax(protected[members] @ sketches.T, axis=1)
        assert len(members) > 400 and np.mean(nearest == b) > 0.9
    # Everyone can be found, wherever they landed.
    for person in (0, 850, 1699):
        probe = x[owner == person][0]
        assert vault.verify("c", f"p{person}", probe.tolist()).matched
        top = vault.identify("c", probe.tolist(), top_k=1)
        assert [c.subject_id for c in top.candidates] == [f"p{person}"]


def test_import_answers_every_item_and_a_retry_stores_nothing_twice(vault: Vault) -> None:
    good = np.random.default_rng(1).standard_normal((5, DIM))
    items = [
        ImportItem("a", good[0].tolist(), "ra"),
        ImportItem("b", good[1][:-1].tolist(), "rb"),  # wrong dimension
        ImportItem("c", [math.nan] + good[2][1:].tolist(), "rc"),  # NaN
        ImportItem("d", [0.0] * DIM, "rd"),  # zero vector
        ImportItem("", good[3].tolist(), "re"),  # empty subject id
        ImportItem("f", good[4].tolist(), "x" * 200),  # request id too long
        ImportItem("a", good[0].tolist(), "ra"),  # the same request twice in one stream
        ImportItem("g", good[4].tolist(), "ra"),  # a request id reused for another subject
        ImportItem("h", good[4].tolist()),  # no request id: fine
    ]
    first = _run(vault, items)
    assert first[0].error is None and first[6].template_id == first[0].template_id
    expected = {1: "dimension is 32", 2: "NaN", 3: "zero vector", 4: "subject_id is empty",
                5: "request_id is 200 bytes", 7: "another subject"}
    for index, text in expected.items():
        assert first[index].error is not None and text in first[index].error.message, index
        assert type(first[index].error) in (InvalidArgument, AlreadyExists)
    assert "0.0" not in first[3].error.message
    assert first[8].error is None
    assert vault.get_collection("c").template_count == 2
    again = _run(vault, items[:1] + items[6:7])
    assert again[0].template_id == first[0].template_id == again[1].template_id
    assert vault.get_collection("c").template_count == 2
    assert vault.enroll("c", "a", good[0].tolist(), "ra") == (first[0].template_id, 1)


def test_a_large_import_keeps_within_its_chunk_budget(tmp_path: Path, hsm_config: HsmConfig) -> None:
    """Chunks are sized by a memory budget: a small budget means several chunks, each
    stored (and answered) before the next is read."""
    v = Vault.open(tmp_path / "d", hsm_config,
                   tuning=Tuning(maintenance_interval=0, workers=0, import_chunk_bytes=8 * DIM * N))
    try:
        v.create_collection("c", DIM, 0.8)
        session = v.start_import("c")
        assert session.chunk == N
        x, owner = _people(1000, 9, 2)
        answered = []
        for start in range(0, len(x), 1000):
            answered.append(len(session.add([ImportItem(f"p{o}", row.tolist())
                                             for row, o in zip(x[start:start + 1000],
                                                               owner[start:start + 1000])])))
        answered.append(len(session.finish()))
        assert answered[:4] == [0, 0, 0, 0] and answered[4] == N and sum(answered) == len(x)
        blocks = v.galleries()[0].blocks.values()
        rest = len(x) - 2 * N
        assert [(b.kind, b.fill) for b in blocks] == [(CLUSTERED, N), (CLUSTERED, N), (MIXED, rest)]
        # A small import fills the mixed tail (a new generation of the same block).
        more = v.start_import("c")
        more.add([ImportItem(f"q{k}", row.tolist()) for k, row in enumerate(x[:500])])
        more.finish()
        blocks = list(v.galleries()[0].blocks.values())
        assert [(b.kind, b.fill) for b in blocks] == [(CLUSTERED, N), (CLUSTERED, N), (MIXED, rest + 500)]
        assert blocks[2].generation == 2
        assert v.get_collection("c").template_count == len(x) + 500
        assert v.verify("c", "q3", x[3].tolist()).matched and v.verify("c", "p0", x[0].tolist()).matched
    finally:
        v.close()


def test_an_import_after_a_damaged_block_keeps_its_templates(tmp_path: Path,
                                                             hsm_config: HsmConfig) -> None:
    """Block numbers come from the store: a block file that fails its check at load keeps
    its number, so the next import does not overwrite its row and the new templates live
    through a restart (the second import used to answer DATA_LOSS for all 4,096)."""
    from vault.domain.errors import DataLoss

    data = tmp_path / "data"
    tuning = Tuning(maintenance_interval=0, workers=0)
    first, _ = _people(N, 1, seed=1)
    second, _ = _people(N, 1, seed=2)
    v = Vault.open(data, hsm_config, tuning=tuning)
    try:
        v.create_collection("c", DIM, 0.8)
        _run(v, [ImportItem(f"a{i}", f.tolist(), f"ra{i}") for i, f in enumerate(first)])
    finally:
        v.close()
    (damaged,) = (data / "blocks").rglob("*.blk")
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    v = Vault.open(data, hsm_config, tuning=tuning)
    try:
        results = _run(v, [ImportItem(f"b{i}", f.tolist(), f"rb{i}") for i, f in enumerate(second)])
        assert all(r.error is None for r in results.values())
    finally:
        v.close()
    v = Vault.open(data, hsm_config, tuning=tuning)
    try:
        for i in (0, 1234, N - 1):
            assert v.verify("c", f"b{i}", second[i].tolist()).matched
        with pytest.raises(DataLoss):
            v.verify("c", "a0", first[0].tolist())
    finally:
        v.close()
