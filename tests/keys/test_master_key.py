"""Master key (KEK) rotation: new version, everything rewrapped, old versions destroyed;
no template decrypted; an interrupted rotation finishes with rewrap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vault.domain.errors import HsmUnavailable
from vault.keys import envelope
from vault.keys.hsm import KEK, HsmConfig
from vault.keys.integrity import encode
from vault.service import Tuning, Vault

TUNING = Tuning(maintenance_interval=0, workers=0)


def _kek_versions(vault: Vault) -> set[int]:
    out = set()
    for kind, _key, blob in vault.store.wrapped_blobs():
        out.add(vault.hsm.wrapped_version(blob) if kind == "data-key"
                else envelope.sealed_kek_version(blob))
    return out


def test_rotation_rewraps_everything_and_destroys_the_old_version(
        tmp_path: Path, spare_hsm_config: HsmConfig) -> None:
    data = tmp_path / "data"
    faces = np.random.default_rng(0).standard_normal((3, 16))
    vault = Vault.open(data, spare_hsm_config, tuning=TUNING)
    try:
        vault.create_collection("c", 16, 0.8)
        vault.create_collection("d", 16, 0.8)
        for i, f in enumerate(faces):
            vault.enroll("c", f"s{i}", f.tolist())
        before, current = vault.master_key_versions()
        old_blobs = vault.store.wrapped_blobs()
        version, rewrapped, destroyed = vault.rotate_master_key()
        assert version == current + 1
        assert rewrapped == len(old_blobs) >= 4  # pii, sketch, two collections' secrets
        assert destroyed == before
        assert vault.master_key_versions() == ([version], version)
        assert _kek_versions(vault) == {version}
        assert vault.hsm.key_attributes(f"vault/kek/v{version}") == {
            "extractable": False, "sensitive": True, "token": True}
        assert vault.verify("c", "s1", faces[1].tolist()).matched
        # A blob from before the rotation (a backup, say) cannot be unwrapped any more.
        kind, key, blob = next(b for b in old_blobs if b[0] == "data-key")
        with pytest.raises(HsmUnavailable, match="key missing"):
            vault.hsm.unwrap(blob, encode(kind, *key))
        # An interrupted rotation: a new version exists, nothing rewrapped yet.
        interrupted = vault.hsm.create_kek()
    finally:
        vault.close()
    vault = Vault.open(data, spare_hsm_config, tuning=TUNING)
    try:
        assert vault.verify("c", "s2", faces[2].tolist()).matched  # older blobs still open
        assert vault.rewrap_keys() == (interrupted, rewrapped, [version])
        assert vault.master_key_versions() == ([interrupted], interrupted)
        assert vault.rewrap_keys() == (interrupted, 0, [])  # idempotent
    finally:
        vault.close()
    vault = Vault.open(data, spare_hsm_config, tuning=TUNING)
    try:
        assert vault.verify("c", "s0", faces[0].tolist()).matched
        with pytest.raises(ValueError, match="current"):
            vault.hsm.destroy_kek(interrupted)
        assert vault.hsm.versions(KEK) == [interrupted]
    finally:
        vault.close()
