"""Key versions written with an older layout (the 50-bit one before issue 14, 16 bytes per
template-dimension; the 32-bit one at template scale 2^19) keep matching after an
upgrade, and a key rotation moves them to the current layout (8 bytes, scale 2^20),
values and decisions intact, without decrypting a template."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.ops.test_rotation import DIM, _faces, _populate, _scores, _wait
from vault.he import DEFAULT_PARAMS, HeParams, poly
from vault.he.params import LEGACY_PARAMS, budget
from vault.keys.hsm import HsmConfig
from vault.service import Tuning, Vault

N = 4096
TUNING = Tuning(maintenance_interval=0, workers=0)


def _block_file_bytes(data: Path, version: int) -> list[int]:
    return sorted(p.stat().st_size for p in (data / "blocks" / "c" / f"v{version}").glob("*.blk"))


# The 50-bit layout (8-byte residues), and issue 14's first 32-bit one (template scale
# 2^19, half today's: the rotation's change of transform is scaled by 2 * q1).
OLDER = {"legacy_50bit": (LEGACY_PARAMS, 8, np.uint64),
         "scale_2_19": (HeParams(template_scale_bits=19), 4, np.uint32)}


@pytest.mark.parametrize("older", sorted(OLDER))
def test_an_older_layout_matches_and_a_rotation_moves_it_to_the_current_one(
        tmp_path: Path, hsm_config: HsmConfig, older: str) -> None:
    old_params, residue_bytes, old_dtype = OLDER[older]
    data = tmp_path / "data"
    vault = Vault.open(data, hsm_config, tuning=TUNING, params=old_params)
    try:
        single, bulk = _populate(vault, N + 50)
        vault.maintain(force=True)  # the journal into a mixed block, at the legacy layout
    finally:
        vault.close()
    legacy = _block_file_bytes(data, 1)
    # Header + per block D x 2 x N residues (8 bytes with the 50-bit prime).
    assert legacy and all(size == 4096 + DIM * 2 * N * residue_bytes for size in legacy)

    vault = Vault.open(data, hsm_config, tuning=TUNING)  # the upgraded vault: new defaults
    try:
        gallery = vault.galleries()[0]
        assert gallery.params == old_params
        assert {b.residues.dtype for b in gallery.blocks.values()} == {np.dtype(old_dtype)}
        probes = np.concatenate([single[:3], bulk[[0, 2000, N + 5]]])
        before = _scores(vault, probes)
        assert [s for s, _ in before] == ["s0", "s1", "s2", "b0", "b2000", f"b{N + 5}"]
        job = vault.rotate_collection_key("c")
        _wait(vault, job.job_id)
        gallery = vault.galleries()[0]
        assert gallery.key_version == 2 and gallery.params == DEFAULT_PARAMS
        assert {b.residues.dtype for b in gallery.blocks.values()} == {np.dtype(np.uint32)}
        assert _block_file_bytes(data, 2) == [4096 + DIM * 2 * N * 4] * len(legacy)
        after = _scores(vault, probes)
        assert [s for s, _ in after] == [s for s, _ in before]
        assert all(abs(a - b) <= 0.02 + 2e-3 for (_, a), (_, b) in zip(after, before))
        # Stored values: the templates under the new transform at the new scale.
        ctx = vault.decider._context("c", 2)
        q = ctx.public.moduli[0]
        row = vault.store.templates_in("c", 2, 1, 0)[0]
        values = np.array([poly.centered(ctx.decrypt(np.ascontiguousarray(ct[:, :1]), False)[0], q)
                           [row.slot] for ct in vault.read_block(gallery, gallery.blocks[0])])
        values = values / DEFAULT_PARAMS.template_scale
        bound = 6 * budget(DEFAULT_PARAMS, 2)["noise_sigma_units"] / DEFAULT_PARAMS.template_scale
        protected = [vault.protect("c", 2, DIM, f)
                     for f in np.concatenate([single, bulk])]
        assert min(np.abs(values - p).max() for p in protected) < bound
        # New enrollments go to the new layout too; a checkpoint keeps them matching.
        vault.enroll("c", "late", _faces(1, 77)[0].tolist())
        vault.maintain(force=True)
        assert vault.verify("c", "late", _faces(1, 77)[0].tolist()).matched
    finally:
        vault.close()
    assert not (data / "blocks" / "c" / "v1").exists() or not _block_file_bytes(data, 1)
