"""Faces at the edge, end to end on a real photo: ``vault embed`` turns it into an embedding
on this side, ``vault import`` enrolls it, and a second capture (the photo mirrored) matches
it through the client package while other people's faces do not.

The photo is matplotlib's sample ``grace_hopper.jpg`` (Grace Hopper's official US Navy
portrait, public domain), shipped in the matplotlib wheel of the bench extra; the other
faces are the LFW embeddings in tests/data, computed with the same dlib model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vault.testing import ServerProcess

pytest.importorskip("dlib", reason="the faces extra (dlib-bin, face_recognition_models)")
matplotlib = pytest.importorskip("matplotlib")

SAMPLES = Path(matplotlib.get_data_path()) / "sample_data"
PHOTO = SAMPLES / "grace_hopper.jpg"
NOT_A_FACE = SAMPLES / "logo2.png"
CLIENT = Path(__file__).resolve().parents[1] / "client"


def _vault(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vault", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_photos_in_enroll_match(tmp_path: Path, server: ServerProcess, lfw: dict) -> None:
    out = tmp_path / "faces.npz"
    made = _vault("embed", str(PHOTO), str(NOT_A_FACE), "--out", str(out))
    assert made.returncode == 1  # one image had no face: said, and the rest written
    assert f"skipped {NOT_A_FACE}: no face found" in made.stderr
    assert "1 embeddings of 1 subjects written" in made.stdout
    with np.load(out) as data:
        assert data["embeddings"].shape == (1, 128)
        assert list(data["subject_ids"]) == ["grace_hopper"]

    sys.path.insert(0, str(CLIENT))
    try:
        from vault_client import VaultClient
        from vault_client.faces import FaceEmbedder, FaceError
    finally:
        sys.path.remove(str(CLIENT))
    with VaultClient(server.target) as vault:
        # dlib's descriptors of different people sit within cosine 0.93 of each other here.
        vault.create_collection("edge", dimension=128, threshold=0.97)
        others = [(f"lfw-{k}", e) for k, e in enumerate(lfw["emb"][:30])]
        assert vault.import_templates("edge", others).new == 30
        imported = _vault("import", str(out), "--collection", "edge", "--target", server.target)
        assert imported.returncode == 0 and "1 new, 0 already stored" in imported.stdout

        embedder = FaceEmbedder()
        image = embedder._dlib.load_rgb_image(str(PHOTO))
        probe = embedder.embed_image(image[:, ::-1], "mirrored")  # a second capture
        assert vault.verify("edge", "grace_hopper", probe)
        assert [c.subject_id for c in vault.identify("edge", probe, top_k=3)] == ["grace_hopper"]
        assert not vault.verify("edge", "grace_hopper", lfw["emb"][40])
        assert not vault.verify("edge", "lfw-0", probe)
        with pytest.raises(FaceError, match="no face found"):
            embedder.embed_file(NOT_A_FACE)
