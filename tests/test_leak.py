"""Play the attacker who copies the whole data directory, and read the logs."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from vault import he
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

N_SUBJECTS = 12  # enrolled one by one (journal pages, then a checkpointed block)
N_IMPORTED = 120  # real faces imported with synthetic padding (a clustered block)
PADDING = 4096


def _needles(emb: np.ndarray, windows: bool = True) -> list[bytes]:
    """Byte patterns an attacker would grep for: raw and normalised, float32 and float64,
    whole vectors and (``windows``) 4-value windows."""
    out = []
    unit = emb / np.linalg.norm(emb)
    for vec in (emb, unit):
        for dtype in (np.float32, np.float64):
            raw = vec.astype(dtype).tobytes()
            out.append(raw)
            if windows:
                step = np.dtype(dtype).itemsize * 4
                out.extend(raw[i:i + step] for i in range(0, len(raw) - step, step * 8))
    return out


@pytest.fixture(scope="module")
def leaked(tmp_path_factory, lfw) -> dict:
    """A server that enrolled and imported real faces, checkpointed its journal and
    erased a deleted subject; then a copy of its whole data directory."""
    root = tmp_path_factory.mktemp("leak")
    emb = lfw["emb"]
    names = lfw["names"]
    ids = lfw["ids"]
    firsts = [int(np.flatnonzero(ids == p)[0]) for p in np.unique(ids)]
    picks = firsts[:N_SUBJECTS]
    imported = firsts[N_SUBJECTS:N_SUBJECTS + N_IMPORTED]
    subjects = [f"{names[ids[i]]}-{i}@example.org" for i in picks]
    imported_subjects = [f"{names[ids[i]]}-{i}@example.org" for i in imported]
    padding = np.random.default_rng(5).standard_normal((PADDING, 128)).astype(np.float32)
    server = ServerProcess(root / "data", env={"VAULT_JOURNAL_PAGES": "1",
                                               "VAULT_ERASE_AFTER": "0"})
    with server:
        with server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="staff", dimension=128,
                                                             threshold=0.92))
            for i, subject in zip(picks, subjects):
                stub.Enroll(pb.EnrollRequest(collection_id="staff", subject_id=subject,
                                             embedding=emb[i].tolist(), request_id=f"req-{subject}"))
            items = [pb.ImportItem(subject_id=s, embedding=emb[i].tolist(), request_id=f"imp-{s}")
                     for i, s in zip(imported, imported_subjects)]
            items += [pb.ImportItem(subject_id=f"pad-{k}", embedding=x.tolist())
                      for k, x in enumerate(padding)]
            batches = [pb.ImportTemplatesRequest(collection_id="staff", items=items[k:k + 500])
                       for k in range(0, len(items), 500)]
            results = [r for resp in stub.ImportTemplates(iter(batches)) for r in resp.results]
            assert len(results) == len(items) and all(r.code == 0 for r in results)
            for i, subject in zip(picks, subjects):
                stub.Match(pb.MatchRequest(collection_id="staff", subject_id=subject,
                                           embedding=emb[i].tolist()))
                stub.Match(pb.MatchRequest(collection_id="staff", embedding=emb[i].tolist(), top_k=3))
            stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id="staff", subject_id=subjects[0]))
            stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id="staff",
                                                       subject_id=imported_subjects[0]))
        # The maintenance thread checkpoints the journal and erases the deletions.
        blocks = root / "data" / "blocks"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            db = sqlite3.connect(f"file:{root / 'data' / 'vault.db'}?mode=ro", uri=True)
            pending = db.execute("SELECT (SELECT count(*) FROM pages) + (SELECT count(*) FROM "
                                 "templates WHERE state=2 AND erased=0)").fetchone()[0]
            db.close()
            if pending == 0:
                break
            time.sleep(0.5)
        assert pending == 0, "maintenance did not checkpoint and erase in time"
        assert len(list(blocks.rglob("*.blk"))) >= 2  # a clustered and a mixed block
    copy = root / "stolen"
    shutil.copytree(root / "data", copy)
    return {"copy": copy, "emb": emb[picks], "imported_emb": emb[imported],
            "subjects": subjects + imported_subjects, "log": server.log_path.read_text()}


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_no_embedding_or_subject_id_in_any_file(leaked: dict) -> None:
    files = _all_files(leaked["copy"])
    assert any(p.name == "vault.db" for p in files)
    blobs = {p: p.read_bytes() for p in files}
    needles = [n for e in leaked["emb"] for n in _needles(e.astype(np.float64))]
    needles += [n for e in leaked["imported_emb"] for n in _needles(e.astype(np.float64), False)]
    for needle in needles:
        for path, data in blobs.items():
            assert needle not in data, f"embedding bytes found in {path.name}"
    for subject in leaked["subjects"]:
        for form in (subject.encode(), subject.encode("utf-16-le"), subject.split("@")[0].encode()):
            for path, data in blobs.items():
                assert form not in data, f"subject id found in {path.name}"


def test_block_sketches_are_sealed(leaked: dict) -> None:
    """The pre-filter's sketches (block centroids, unit vectors) are AES-GCM at rest: no
    window of a stored sketch reads as a unit vector of floats."""
    db = sqlite3.connect(leaked["copy"] / "vault.db")
    sketches = [r[0] for r in db.execute("SELECT sketch FROM blocks WHERE sketch IS NOT NULL")]
    assert sketches, "no clustered block was stored"
    for blob in sketches:
        assert len(blob) == 12 + 128 * 4 + 16  # nonce, ciphertext, tag
        for dtype in (np.float32, np.float64):
            size = 128 * np.dtype(dtype).itemsize
            for offset in range(0, len(blob) - size + 1, 4):
                vec = np.frombuffer(blob[offset:offset + size], dtype)
                with np.errstate(all="ignore"):
                    norm = float(np.linalg.norm(vec.astype(np.float64)))
                assert not abs(norm - 1.0) < 1e-3


def test_database_holds_only_ciphertexts_wrapped_keys_and_macs(leaked: dict) -> None:
    db = sqlite3.connect(leaked["copy"] / "vault.db")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "templates" in tables
    cols = {r[1] for r in db.execute("PRAGMA table_info(templates)")}
    assert not {"embedding", "vector", "subject_id"} & cols
    # The CKKS secret key is sealed: the stored public context carries no secret key.
    public, = db.execute("SELECT public_context FROM collection_keys").fetchone()
    assert not ts.context_from(public).has_secret_key()
    # Journal pages and blocks hold ciphertexts only; block sketches are sealed.
    cols = {r[1] for r in db.execute("PRAGMA table_info(blocks)")}
    assert cols == {"collection_id", "key_version", "block_no", "kind", "generation", "levels",
                    "fill", "digest", "sketch", "mac"}


def test_without_the_token_nothing_decrypts(leaked: dict, tmp_path: Path) -> None:
    copy = leaked["copy"]
    shutil.rmtree(copy / "hsm")  # the attacker has the files, not the token
    db = sqlite3.connect(copy / "vault.db")
    params_json, public, sealed = db.execute(
        "SELECT he_params, public_context, sealed_secret_context FROM collection_keys").fetchone()
    params = he.HeParams.from_json(params_json)
    # The only CKKS key in the clear is the public one: nothing it could decrypt with.
    assert he.PublicContext(public, params).has_secret_key() is False
    with pytest.raises(ValueError, match="no secret key"):
        he.SecretContext(public, params)
    # The sealed secret context is AES-GCM under a key wrapped by the token's KEK.
    assert b"CKKS" not in sealed and len(sealed) > 1000
    # A token of their own, with the same labels, cannot unwrap the vault's keys. In a
    # separate process: SoftHSM reads its configuration once per process.
    script = tmp_path / "attack.py"
    script.write_text(
        "import sys, sqlite3\n"
        "from pathlib import Path\n"
        "from vault.keys import envelope, softhsm\n"
        "from vault.keys.hsm import Hsm\n"
        "from vault.keys.integrity import encode\n"
        "from vault.errors import DataLoss\n"
        "hsm = Hsm(softhsm.provision(Path(sys.argv[1]), token_label='vault'))\n"
        "hsm.ensure_keys()\n"
        "db = sqlite3.connect(sys.argv[2])\n"
        "p, sealed = db.execute('SELECT he_params, sealed_secret_context FROM collection_keys').fetchone()\n"
        "try:\n"
        "    envelope.open_sealed(hsm, sealed, encode('ckks-secret', 'staff', 1, p))\n"
        "    print('DECRYPTED')\n"
        "except DataLoss:\n"
        "    print('refused')\n")
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "attacker-hsm"),
                          str(copy / "vault.db")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.stdout.strip() == "refused", out.stderr[-2000:]


def test_logs_hold_no_embedding_score_or_subject_id(leaked: dict) -> None:
    log = leaked["log"]
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line.get("method") == "Match" for line in lines)
    assert any(line.get("method") == "Enroll" for line in lines)
    for subject in leaked["subjects"]:
        assert subject not in log and subject.split("@")[0] not in log
    for emb in leaked["emb"]:
        for value in emb[:16]:
            assert f"{value:.5f}"[:7] not in log
    for line in lines:
        assert "score" not in line and "embedding" not in line and "subject_id" not in line
